"""Dynamic Mask Attention (DMA): the op, its plain-jnp reference, and the dispatcher.

Semantics (exactly `transformers` DogeAttention with `attn_implementation="eager"`, shared/research/doge.md s4):

    bias[b, g, j]   = exp(A_g * softplus(dt_proj(v_j))_g)          (computed by the layer, passed in as key_bias)
    allowed[i, j]   = key_mask[j] & key_pos[j] <= query_pos[i]     (causal + padding)
                      [& seg[i] == seg[j]] [& key_pos[j] > query_pos[i] - sliding_window]
    tau[i]          = the keep_window_size-th largest bias[j] over allowed j (-inf if fewer are allowed)
    kept[i, j]      = allowed[i, j] & bias[j] >= tau[i]             (the top-keep_window_size keys of row i)
    S[i, j]         = scale * q_i . k_j + (bias[j] if kept[i, j] else finfo(f32).min)
    out[i]          = softmax_j(S[i, :]) @ V

Ties: keys whose bias equals tau[i] are all kept (deterministic); HF's torch.topk breaks ties arbitrarily, so
parity is exact only for distinct biases. A row with no allowed key gets the uniform average of all values,
as in HF (every score is finfo.min); such rows are padding queries whose outputs are never used.

The reference materializes [batch, heads, Sq, Sk] scores (O(L^2) memory); `pallas_kernels.dmattn` is the
O(L)-memory GPU kernel with the same meaning.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["dynamic_mask_attention", "dynamic_mask_attention_reference", "keep_threshold_reference"]


def _allowed_mask(query_positions, key_positions, key_mask, query_segment_ids, key_segment_ids, sliding_window):
    """[b, Sq, Sk] bool: causal (by position) + padding (+ document, + sliding window)."""
    qp = query_positions[:, :, None]
    kp = key_positions[:, None, :]
    allowed = kp <= qp
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].astype(bool)
    if query_segment_ids is not None:
        allowed = allowed & (query_segment_ids[:, :, None] == key_segment_ids[:, None, :])
    if sliding_window is not None:
        allowed = allowed & (kp > qp - sliding_window)
    return allowed


def keep_threshold_reference(key_bias, allowed, keep_window_size):
    """tau [b, hb, Sq]: the keep_window_size-th largest allowed bias of each row (-inf if fewer allowed).

    key_bias [b, hb, Sk] (f32), allowed [b, Sq, Sk] bool.
    """
    sk = key_bias.shape[-1]
    masked = jnp.where(allowed[:, None, :, :], key_bias[:, :, None, :], -jnp.inf)  # [b, hb, Sq, Sk]
    if keep_window_size >= sk:
        return jnp.full(masked.shape[:-1], -jnp.inf, masked.dtype)
    top = jax.lax.top_k(masked, keep_window_size)[0]
    return top[..., -1]


def dynamic_mask_attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_bias: jax.Array,
    *,
    keep_window_size: int,
    query_positions: jax.Array,
    key_positions: jax.Array,
    key_mask: Optional[jax.Array] = None,
    query_segment_ids: Optional[jax.Array] = None,
    key_segment_ids: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """Plain-jnp DMA (the definition). Shapes:

    query [b, Sq, H, D]; key, value [b, Sk, G, D] (H % G == 0, GQA); key_bias [b, Hb, Sk] with Hb in {G, H}
    (per kv head, HF-native; per query head, legacy SmallDoge); query_positions [b, Sq], key_positions [b, Sk]
    int32; key_mask [b, Sk] (1 = real key); segment ids [b, Sq] / [b, Sk]. Returns [b, Sq, H, D] in query.dtype.
    Scores, bias and softmax are f32.
    """
    b, sq, h, d = query.shape
    g = key.shape[2]
    hb = key_bias.shape[1]
    if h % g or hb not in (g, h):
        raise ValueError(f"dynamic_mask_attention: heads={h}, kv heads={g}, bias heads={hb} are inconsistent")
    scale = d ** -0.5 if scale is None else scale
    allowed = _allowed_mask(query_positions, key_positions, key_mask, query_segment_ids, key_segment_ids,
                            sliding_window)
    key_bias = key_bias.astype(jnp.float32)
    tau = keep_threshold_reference(key_bias, allowed, keep_window_size)  # [b, hb, Sq]
    kept = allowed[:, None] & (key_bias[:, :, None, :] >= tau[..., None])  # [b, hb, Sq, Sk]
    mask_add = jnp.where(kept, key_bias[:, :, None, :], jnp.finfo(jnp.float32).min)
    # group query heads by kv head: [b, G, r, Sq, D]
    r = h // g
    q = query.astype(jnp.float32).reshape(b, sq, g, r, d).transpose(0, 2, 3, 1, 4)
    k = key.astype(jnp.float32).transpose(0, 2, 1, 3)  # [b, G, Sk, D]
    v = value.astype(jnp.float32).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bgrqd,bgkd->bgrqk", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    if hb == g:
        scores = scores + mask_add[:, :, None]
    else:
        scores = scores + mask_add.reshape(b, g, r, sq, -1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrqk,bgkd->bgrqd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, d).astype(query.dtype)


def _kernel_partition_specs(query, key, key_bias):
    """Batch / head mesh axes for running the kernel per shard, from the active mesh and flax logical rules.

    A Pallas custom call has no sharding rule: under GSPMD its operands would be all-gathered and every device
    would run the whole batch. So when a mesh is active (``jax.set_mesh``) and the logical rules
    (``nn.logical_axis_rules``) map ``activation_batch`` / ``activation_kv_heads`` to mesh axes, the dispatcher
    runs the kernel inside ``jax.shard_map`` over those axes (each shard: its batch rows, its kv-head group
    with the matching query heads). Returns (batch_axes, head_axes) or None when there is nothing to split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None  # already inside a shard_map: operands are local
    import flax.linen as nn

    def axes_for(name, dim):
        spec = nn.logical_to_mesh_axes((name,))[0]
        if spec is None:
            return ()
        spec = (spec,) if isinstance(spec, str) else tuple(spec)
        spec = tuple(a for a in spec if a in mesh.axis_names and mesh.shape[a] > 1)
        size = 1
        for a in spec:
            size *= mesh.shape[a]
        return spec if spec and dim % size == 0 else ()

    try:
        batch_axes = axes_for("activation_batch", query.shape[0])
        head_axes = axes_for("activation_kv_heads", key.shape[2])
    except Exception:  # no logical rules in context
        return None
    if head_axes:
        size = 1
        for a in head_axes:
            size *= mesh.shape[a]
        if query.shape[2] % size or key_bias.shape[1] % size:
            head_axes = ()
    if not batch_axes and not head_axes:
        return None
    return batch_axes, head_axes


def _sharded_kernel_call(kernel_fn, axes, query, key, value, key_bias, kwargs):
    """Run `kernel_fn` per shard with jax.shard_map (see `_kernel_partition_specs`)."""
    from jax.sharding import PartitionSpec as P

    batch_axes, head_axes = axes
    bt = batch_axes or None
    hd = head_axes or None
    names = ("query_positions", "key_positions", "key_mask", "query_segment_ids", "key_segment_ids")
    arrays = {n: kwargs[n] for n in names if kwargs.get(n) is not None}
    static = {n: v for n, v in kwargs.items() if n not in names}
    in_specs = (P(bt, None, hd, None), P(bt, None, hd, None), P(bt, None, hd, None), P(bt, hd, None),
                {n: P(bt, None) for n in arrays})

    def local(q, k, v, kb, arr):
        return kernel_fn(q, k, v, kb, **arr, **static)

    mesh = jax.sharding.get_abstract_mesh()
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit sharding: reshard first
        query, key, value, key_bias, arrays = jax.tree_util.tree_map(
            jax.reshard, (query, key, value, key_bias, arrays), in_specs)
    return jax.shard_map(local, in_specs=in_specs, out_specs=P(bt, None, hd, None), check_vma=False)(
        query, key, value, key_bias, arrays)


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover
        return False


def dynamic_mask_attention(
    query, key, value, key_bias, *, keep_window_size, query_positions, key_positions, key_mask=None,
    query_segment_ids=None, key_segment_ids=None, sliding_window=None, scale=None, implementation=None,
):
    """Dispatcher: `implementation` in {None (auto), "reference", "pallas"}.

    Auto picks the Pallas kernel on GPU when it supports the call (see `pallas_kernels.dmattn.supports`) and
    the reference elsewhere. Under an active mesh the kernel runs per shard (`_kernel_partition_specs`).
    Shapes and semantics: `dynamic_mask_attention_reference`.
    """
    kwargs = dict(keep_window_size=keep_window_size, query_positions=query_positions, key_positions=key_positions,
                  key_mask=key_mask, query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
                  sliding_window=sliding_window, scale=scale)
    if implementation not in (None, "reference", "pallas"):
        raise ValueError(f"dynamic_mask_attention: implementation={implementation!r}; "
                         "expected None, 'reference' or 'pallas'")
    if implementation == "reference":
        return dynamic_mask_attention_reference(query, key, value, key_bias, **kwargs)
    if implementation == "pallas" or _on_gpu():
        try:
            from pallas_kernels import dmattn as _kernel
        except ImportError:
            _kernel = None
        supported = _kernel is not None and hasattr(_kernel, "supports") and _kernel.supports(
            query, key, value, key_bias, **kwargs)
        if supported:
            axes = _kernel_partition_specs(query, key, key_bias)
            if axes is not None:
                return _sharded_kernel_call(_kernel.dynamic_mask_attention_pallas, axes, query, key, value,
                                            key_bias, kwargs)
            return _kernel.dynamic_mask_attention_pallas(query, key, value, key_bias, **kwargs)
        if implementation == "pallas":
            raise ValueError("dynamic_mask_attention: the Pallas kernel does not support this call "
                             f"(q {query.shape}, k {key.shape}, bias {key_bias.shape}, segments="
                             f"{query_segment_ids is not None}, sliding_window={sliding_window})")
    return dynamic_mask_attention_reference(query, key, value, key_bias, **kwargs)
