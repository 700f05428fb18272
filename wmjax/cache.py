"""Decode caches: one pytree for the whole model, static shapes, jit-friendly.

Model level: {"length": int32 scalar (tokens fed so far = slots written for a full cache), "layers": tuple with one
per-layer cache}. Each per-layer cache is a small pytree dataclass whose class says its kind (`cache_kind`), so
a model can mix kinds layer by layer (hybrids: attention layers carry a KV cache, state-space layers their
recurrent state). Per-layer caches also read like dicts (`layer_cache["key"]`).

Kinds
-----
`KVCache` ("kv", the full cache), per attention layer, C = max_length slots (rounded up to `multiple_of`):
    key, value      [batch, kv_heads, C, head_dim]            (RoPE already applied to keys)
    key_bias        [batch, bias_heads, C] f32                (exp(A * softplus(dt_proj(v))) per cached key)
    key_position    [batch, C] int32                          (position of the token in each slot)
    key_mask        [batch, C] bool                           (slot holds a real token)
  Caching the per-key bias is exact: it depends only on that key's own value vector (docs/DOGE.md, Cached decoding).
  This is the layout the fused decode kernels read and write in place (`wmjax.fused_decode`), so decoding takes
  over from prefill on the same cache.

`BoundedKVCache` ("bounded_kv"), per attention layer, w = keep_window_size slots per *bias head*:
    key, value      [batch, bias_heads, w, head_dim]
    key_bias        [batch, bias_heads, w] f32
    key_position    [batch, bias_heads, w] int32
    key_mask        [batch, bias_heads, w] bool
  Why it is exact: a query keeps the w keys of largest bias among the keys it sees (ties: all keys equal to the
  w-th largest). The keys a later query sees are a superset of those an earlier one saw (a growing prefix), so
  the w-th largest bias seen never decreases, and a key that is not among the top w of some prefix can never be
  kept by any later query. A layer therefore needs only the current top w (+ the tokens being fed): every step
  the new keys join the w slots as candidates, attention runs over the candidates with the DMA rule, and the
  candidates of smallest bias are evicted. Decode memory is O(w) whatever the generated length; results equal the
  full cache except where biases tie exactly at the eviction boundary (the full cache keeps every tied key, the
  bounded one keeps w of them). With bias heads = kv heads (HF-native) the slots are per kv head; with the legacy
  per-query-head bias (`dt_heads="query"`) each query head has its own w slots (keys/values repeated per head).
  Not valid with a sliding window (the seen set is then not a growing prefix): `init_cache` refuses it.

`SSMCache` ("ssm"), per state-space layer (Cheems / OTCE / Om, later):
    ssm_state       [batch, heads, head_dim, state_size] f32   (recurrent state h_t)
    conv_state      [batch, conv_width - 1, conv_channels]      (last inputs of the causal depthwise conv; absent
                                                                 (None) for layers without a convolution)
  Built with `init_ssm_layer_cache`; a config lists its layer kinds in `layer_types` (absent: all attention).

Sharding: `cache_logical_axes(cache)` gives logical axis names per leaf (train/sharding.py rules: batch over
data/fsdp, heads over tensor), so `nn.logical_to_mesh_sharding` / the training mesh rules apply unchanged.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pallas_kernels.dmattn.reference import dynamic_mask_softmax

__all__ = ["KVCache", "BoundedKVCache", "SSMCache", "init_cache", "init_kv_layer_cache",
           "init_bounded_kv_layer_cache", "init_ssm_layer_cache", "layer_kinds", "write_kv", "bounded_kv_attention",
           "cache_logical_axes", "cache_shardings", "cache_nbytes", "kv_decode_attention", "CACHE_KINDS"]

CACHE_KINDS = ("full", "bounded")


class _DictLike:
    def __getitem__(self, name):
        return getattr(self, name)

    def keys(self):
        return [f for f in self.__dataclass_fields__]


@flax.struct.dataclass
class KVCache(_DictLike):
    key: jax.Array
    value: jax.Array
    key_bias: jax.Array
    key_position: jax.Array
    key_mask: jax.Array
    cache_kind: ClassVar[str] = "kv"


@flax.struct.dataclass
class BoundedKVCache(_DictLike):
    key: jax.Array
    value: jax.Array
    key_bias: jax.Array
    key_position: jax.Array
    key_mask: jax.Array
    cache_kind: ClassVar[str] = "bounded_kv"


@flax.struct.dataclass
class SSMCache(_DictLike):
    ssm_state: jax.Array
    conv_state: Optional[jax.Array] = None
    cache_kind: ClassVar[str] = "ssm"


# ---------------------------------------------------------------------------------------------------- builders
def init_kv_layer_cache(batch: int, max_length: int, kv_heads: int, head_dim: int, bias_heads: int, dtype):
    return KVCache(
        key=jnp.zeros((batch, kv_heads, max_length, head_dim), dtype),
        value=jnp.zeros((batch, kv_heads, max_length, head_dim), dtype),
        key_bias=jnp.zeros((batch, bias_heads, max_length), jnp.float32),
        key_position=jnp.zeros((batch, max_length), jnp.int32),
        key_mask=jnp.zeros((batch, max_length), bool),
    )


def init_bounded_kv_layer_cache(batch: int, window: int, head_dim: int, bias_heads: int, dtype):
    return BoundedKVCache(
        key=jnp.zeros((batch, bias_heads, window, head_dim), dtype),
        value=jnp.zeros((batch, bias_heads, window, head_dim), dtype),
        key_bias=jnp.full((batch, bias_heads, window), -jnp.inf, jnp.float32),
        key_position=jnp.zeros((batch, bias_heads, window), jnp.int32),
        key_mask=jnp.zeros((batch, bias_heads, window), bool),
    )


def init_ssm_layer_cache(batch: int, heads: int, head_dim: int, state_size: int, conv_width: int = 0,
                         conv_channels: int = 0, dtype=jnp.float32):
    """Recurrent state (f32) and, for layers with a causal conv of width conv_width > 1, its last inputs."""
    conv = None
    if conv_width > 1:
        conv = jnp.zeros((batch, conv_width - 1, conv_channels), dtype)
    return SSMCache(ssm_state=jnp.zeros((batch, heads, head_dim, state_size), jnp.float32), conv_state=conv)


def layer_kinds(config) -> tuple:
    """Per-layer kinds: config.layer_types if the config has it (hybrids), else all "attention"."""
    kinds = getattr(config, "layer_types", None)
    if kinds is None:
        return ("attention",) * config.num_hidden_layers
    return tuple(kinds)


def init_cache(config, batch: int, max_length: int, dtype=jnp.float32, kind: str = "full", multiple_of: int = 1):
    """An empty cache for `config`: attention layers get a full KV cache of `max_length` slots per row
    (kind="full"; rounded up to a multiple of `multiple_of`, e.g. the fused decode kernels' cache block; the extra
    slots are never valid) or a bounded dynamic-mask cache of keep_window_size slots per bias head (kind="bounded";
    `max_length` and `multiple_of` are then unused). State-space layers (hybrids) get an `SSMCache` via
    `config.ssm_cache_shape`."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"init_cache: kind={kind!r}; expected one of {CACHE_KINDS}")
    if batch <= 0:
        raise ValueError(f"init_cache: batch={batch} must be positive")
    if kind == "full" and max_length <= 0:
        raise ValueError(f"init_cache: max_length={max_length} must be positive")
    if multiple_of <= 0:
        raise ValueError(f"init_cache: multiple_of={multiple_of} must be positive")
    max_length = -(-max_length // multiple_of) * multiple_of
    if kind == "bounded" and getattr(config, "sliding_window", None) is not None:
        raise ValueError("init_cache: the bounded dynamic-mask cache is exact only without a sliding window "
                         f"(config.sliding_window={config.sliding_window}); use kind='full'")
    layers = []
    for i, lk in enumerate(layer_kinds(config)):
        if lk == "attention":
            if kind == "full":
                layers.append(init_kv_layer_cache(batch, max_length, config.num_key_value_heads, config.head_dim,
                                                  config.num_bias_heads, dtype))
            else:
                layers.append(init_bounded_kv_layer_cache(batch, config.keep_window_size, config.head_dim,
                                                          config.num_bias_heads, dtype))
        elif lk in ("ssm", "mamba", "ssd"):
            shape_fn = getattr(config, "ssm_cache_shape", None)
            if shape_fn is None:
                raise NotImplementedError(f"init_cache: layer {i} is a state-space layer but the config has no "
                                          "ssm_cache_shape() (heads, head_dim, state_size, conv_width, conv_channels)")
            layers.append(init_ssm_layer_cache(batch, *shape_fn(i), dtype=dtype))
        else:
            raise ValueError(f"init_cache: layer {i} has unknown kind {lk!r}")
    return {"length": jnp.zeros((), jnp.int32), "layers": tuple(layers)}


def cache_logical_axes(cache):
    """Same structure as `cache`; each array leaf replaced by a tuple of logical axis names."""
    def layer_axes(lc):
        if isinstance(lc, KVCache):
            hb = "activation_kv_heads" if lc.key_bias.shape[1] == lc.key.shape[1] else "activation_heads"
            return KVCache(key=("activation_batch", "activation_kv_heads", None, None),
                           value=("activation_batch", "activation_kv_heads", None, None),
                           key_bias=("activation_batch", hb, None), key_position=("activation_batch", None),
                           key_mask=("activation_batch", None))
        if isinstance(lc, BoundedKVCache):
            a = ("activation_batch", "activation_kv_heads")
            return BoundedKVCache(key=a + (None, None), value=a + (None, None), key_bias=a + (None,),
                                  key_position=a + (None,), key_mask=a + (None,))
        if isinstance(lc, SSMCache):
            return SSMCache(ssm_state=("activation_batch", "activation_heads", None, None),
                            conv_state=None if lc.conv_state is None else ("activation_batch", None, None))
        raise TypeError(f"cache_logical_axes: unknown layer cache {type(lc).__name__}")
    return {"length": (), "layers": tuple(layer_axes(lc) for lc in cache["layers"])}


def cache_nbytes(cache) -> int:
    """Total bytes of the cache's arrays (works on abstract shapes from jax.eval_shape too)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(cache))


# ---------------------------------------------------------------------------------------------------- full cache
def write_kv(layer_cache, key, value, key_bias, positions, token_mask, length):
    """Write s new tokens into slots [length, length + s). key/value [b, s, G, D], key_bias [b, Hb, s]."""
    upd = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), length, axis)
    return KVCache(
        key=upd(layer_cache["key"], key.transpose(0, 2, 1, 3), 2),
        value=upd(layer_cache["value"], value.transpose(0, 2, 1, 3), 2),
        key_bias=upd(layer_cache["key_bias"], key_bias, 2),
        key_position=upd(layer_cache["key_position"], positions.astype(jnp.int32), 1),
        key_mask=upd(layer_cache["key_mask"], token_mask.astype(bool), 1),
    )


# ---------------------------------------------------------------------------------------------------- bounded
def bounded_kv_attention(cache: BoundedKVCache, query, key, value, key_bias, positions, token_mask, *,
                         keep_window_size: int, scale: float):
    """Feed s tokens through one attention layer with a bounded dynamic-mask cache.

    query [b, s, H, D]; key/value [b, s, G, D]; key_bias [b, Hb, s] f32; positions, token_mask [b, s].
    Candidates = the w cached slots + the s new keys (per bias head). Query i attends, with the DMA rule
    (`pallas_kernels.dmattn.reference.dynamic_mask_softmax`), to the candidates it may see (valid, position <=
    its own) whose bias is >= the w-th largest of those. The new cache holds the w candidates of largest bias
    among all valid ones.
    Returns (out [b, s, H, D] in query.dtype, new cache).
    """
    b, s, h, d = query.shape
    g = key.shape[2]
    hb = key_bias.shape[1]
    w = cache.key.shape[2]
    if w != keep_window_size:
        raise ValueError(f"bounded cache has {w} slots but keep_window_size={keep_window_size}")
    if hb not in (g, h):
        raise ValueError(f"bias heads {hb} must equal kv heads {g} or query heads {h}")
    # new keys per bias head: [b, Hb, s, D]
    k_new = key.transpose(0, 2, 1, 3)
    v_new = value.transpose(0, 2, 1, 3)
    if hb != g:
        k_new = jnp.repeat(k_new, h // g, axis=1)
        v_new = jnp.repeat(v_new, h // g, axis=1)
    ck = jnp.concatenate([cache.key, k_new.astype(cache.key.dtype)], axis=2)          # [b, Hb, n, D]
    cv = jnp.concatenate([cache.value, v_new.astype(cache.value.dtype)], axis=2)
    cb = jnp.concatenate([cache.key_bias, key_bias.astype(jnp.float32)], axis=2)        # [b, Hb, n]
    cpos = jnp.concatenate([cache.key_position, jnp.broadcast_to(positions[:, None].astype(jnp.int32),
                                                                  (b, hb, s))], axis=2)
    cmask = jnp.concatenate([cache.key_mask, jnp.broadcast_to(token_mask[:, None].astype(bool), (b, hb, s))],
                            axis=2)
    allowed = cmask[:, :, None, :] & (cpos[:, :, None, :] <= positions[:, None, :, None])  # [b, Hb, s, n]
    r = h // hb
    q = query.astype(jnp.float32).reshape(b, s, hb, r, d).transpose(0, 2, 3, 1, 4)    # [b, Hb, r, s, D]
    hp = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bhrqd,bhkd->bhrqk", q, ck.astype(jnp.float32), precision=hp) * scale
    probs = dynamic_mask_softmax(scores, cb[:, :, None], allowed[:, :, None], keep_window_size)
    out = jnp.einsum("bhrqk,bhkd->bhrqd", probs, cv.astype(jnp.float32), precision=hp)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d).astype(query.dtype)

    # eviction: keep the w valid candidates of largest bias
    retain = jnp.where(cmask, cb, -jnp.inf)
    if s == 1:
        # evict the smallest (first among ties, so empty slots go first); index w = the new key itself -> dropped
        evict = jnp.argmin(retain, axis=-1)                                             # [b, Hb]
        bi = jnp.arange(b)[:, None]
        hi = jnp.arange(hb)[None, :]
        put = lambda buf, new: buf.at[bi, hi, evict].set(new.astype(buf.dtype), mode="drop")
        new_cache = BoundedKVCache(key=put(cache.key, k_new[:, :, 0]), value=put(cache.value, v_new[:, :, 0]),
                                   key_bias=put(cache.key_bias, cb[:, :, w]),
                                   key_position=put(cache.key_position, cpos[:, :, w]),
                                   key_mask=put(cache.key_mask, cmask[:, :, w]))
    else:
        _, idx = jax.lax.top_k(retain, w)                                               # [b, Hb, w]
        take = lambda a: jnp.take_along_axis(a, idx, axis=2)
        take4 = lambda a: jnp.take_along_axis(a, idx[..., None], axis=2)
        new_cache = BoundedKVCache(key=take4(ck), value=take4(cv), key_bias=take(cb), key_position=take(cpos),
                                   key_mask=take(cmask))
    return out, new_cache


def kv_decode_attention(cache: KVCache, query, query_positions, *, keep_window_size: int, scale: float,
                        sliding_window: Optional[int] = None):
    """One query per row over a full KV cache (already holding the new token): the DMA semantics
    (`pallas_kernels.dmattn.reference.dynamic_mask_softmax`) for Sq = 1, written for decode: the cache read in
    its own layout with f32 accumulation (exact products of bf16/f32 inputs, as the reference's f32 upcast).

    query [b, 1, H, D]; query_positions [b, 1]. Returns [b, 1, H, D] in query.dtype.
    """
    b, _, h, d = query.shape
    keys, values = cache.key, cache.value  # [b, G, C, D]
    g, c = keys.shape[1], keys.shape[2]
    bias = cache.key_bias  # [b, Hb, C] f32
    hb = bias.shape[1]
    allowed = cache.key_mask & (cache.key_position <= query_positions)  # [b, C]
    if sliding_window is not None:
        allowed = allowed & (cache.key_position > query_positions - sliding_window)
    r = h // g
    q = query.reshape(b, g, r, d)
    hp = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bgrd,bgcd->bgrc", q, keys.astype(query.dtype), precision=hp,
                        preferred_element_type=jnp.float32) * scale
    bias = bias[:, :, None] if hb == g else bias.reshape(b, g, r, c)  # [b, G, 1 | r, C]
    probs = dynamic_mask_softmax(scores[..., None, :], bias, allowed[:, None, None, None, :], keep_window_size)
    out = jnp.einsum("bgrc,bgcd->bgrd", probs[..., 0, :], values.astype(query.dtype).astype(jnp.float32),
                     precision=hp)
    return out.reshape(b, 1, h, d).astype(query.dtype)


def _is_axes(x):
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def cache_shardings(cache, mesh, rules):
    """NamedShardings for `cache` on `mesh` under flax logical `rules` (e.g. train.sharding.flax_rules()):
    batch over the data axes, kv heads over the tensor axis, like the activations in training."""
    return jax.tree_util.tree_map(lambda names: NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules)),
                                  cache_logical_axes(cache), is_leaf=_is_axes)
