"""Om LLM (dingo-actual/om, `OmLLM` + `ARCformer`): a segment-recurrent LM with a bounded state, in Flax linen.

    stream  = [d look-back tokens | input tokens]          d = max(ngram_sizes) - 1 (pad ids before the 1st token)
    h       = embed(stream) + n-gram features (wmjax.layers.ngram), the look-back positions dropped
    segments of L = segment_len tokens, lax.scan over them; carry = per-layer states M_l [b, S, D]:
        per layer (ARCformer, post-LN on main):
            y, M' = ARC(h, M_l)                           (wmjax.layers.arc)
            h = LN_attn(h + drop(y));  h = LN_mlp(h + drop(MLP(h)));  M_l <- LN_state(M')
        a segment that is not complete (fewer than L tokens) gives its tokens' logits but never advances M
    logits  = proj_out(h)                                 (untied head; no final norm: the blocks end with one)

`logits, cache = model.apply({"params": p}, input_ids [b, s], positions=None, cache=None, attention_mask=None,
segment_ids=None, deterministic=True, output_router_logits=None, return_hidden=False)`: one logit row per input
token (row t predicts token t + 1). `positions` is accepted and ignored (positions restart every segment inside
ARC). `segment_ids` must be None (`accepts_segment_ids = False`): Om reads one stream in fixed segments, as the
original trains on packed documents (no reset at document starts). `attention_mask` [b, s]: tokens with mask 0
are dropped from the row's stream (each row gives what it gives alone: left padding is exact); their logits are
unspecified (finite).

Cache (`init_cache`): {"states" [NL, b, S, D] (after the last complete segment), "context" [b, d] (the d tokens
before the current segment), "tokens" [b, L] (the current partial segment), "count" [b] (its length), "segments"
[b] (complete segments consumed; 0 -> the learned init_state is used), "kv" (per layer, per pass (K, V)
[b, H, S + L, dk / dv] in the cache dtype: the leading state rows and the partial segment's rows), "kv_valid" [b]}. A call with a
cache appends its tokens to each row's stream: the segments that complete advance the states, the rest becomes the
new partial segment (its K/V rebuilt). A decode step (s = 1) runs only the new token's row of its segment against
the K/V cache (a row of a pass depends only on earlier rows), computes the trailing state rows (the next state)
when the segment completes and the leading state rows' K/V when the next one starts: exactly the logits of
recomputing the whole sequence (tests/test_om.py). A cache without "kv" decodes by recomputing the partial segment
(O((L + 2S)^2) per token, upstream's implied protocol).

`ngram_scope` (static): "segment" (default) computes each segment's embeddings and n-gram features inside the
scan from its L tokens + d look-back tokens, so inference temporaries do not grow with the length; "sequence"
computes them once over the whole stream before the scan (same values; O(length) temporaries).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.configs.om import OmConfig
from wmjax.layers.arc import ARC
from wmjax.layers.ngram import NGramEmbedding, ngram_features
from wmjax.layers.norm import RMSNorm
from wmjax.models.causal_lm import embedding, init_fn, logical_axes, random_params
from wmjax.models.registry import Family

__all__ = ["OmMLP", "ARCformer", "OmForCausalLM", "init_params", "param_logical_axes", "init_cache", "describe",
           "NGRAM_SCOPES", "FAMILY"]

NGRAM_SCOPES = ("segment", "sequence")
_ACT = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu, "abs": jnp.abs}


def _uniform(bound: float, axes):
    """PyTorch's default nn.Linear init: U(-bound, bound), bound = 1/sqrt(fan_in)."""
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return nn.with_logical_partitioning(init, tuple(axes))


def _linear(features, fan_in, axes, use_bias, dtype, param_dtype, name, std=None):
    """nn.Dense, kernel [in, out]; init N(0, std) if std else PyTorch's default (kernel and bias uniform)."""
    bound = 1.0 / math.sqrt(fan_in)
    k_init = nn.with_logical_partitioning(nn.initializers.normal(std), tuple(axes)) if std else _uniform(bound, axes)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=k_init,
                    bias_init=_uniform(bound, axes[-1:]), name=name)


class OmMLP(nn.Module):
    """x [b, L, D] -> [b, L, D]: Linear(D, F) -> act -> Linear(F, D) (upstream nn.Sequential `mlp.0`, `mlp.2`:
    params `layers_0`, `layers_2`), or with mlp_1221 Linear(D, F/2) -> act -> Linear(F/2, F/2) -> act ->
    Linear(F/2, D) (`layers_0`, `layers_2`, `layers_4`). The last weight is N(0, 1/sqrt(2 NL)); the rest use
    PyTorch's default init."""

    config: OmConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        D, F = cfg.hidden_size, cfg.intermediate_size
        widths = [D, F // 2, F // 2, D] if cfg.mlp_1221 else [D, F, D]
        act = _ACT[cfg.hidden_act]
        n = len(widths) - 1
        for i in range(n):
            last = i == n - 1
            axes = ("mlp", "embed") if last else (("embed", "mlp") if i == 0 else ("mlp", "mlp"))
            x = _linear(widths[i + 1], widths[i], axes, cfg.mlp_bias, self.dtype, self.param_dtype,
                        f"layers_{2 * i}", std=math.sqrt(1.0 / (2 * cfg.num_hidden_layers)) if last else None)(x)
            if not last:
                x = act(x)
        return x


def _layer_norm(cfg: OmConfig, dtype, param_dtype, name):
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class ARCformer(nn.Module):
    """One layer on one segment: (x [b, L, D], state [b, S, D]) -> (x', state').

    main:      x1 = LN_attn(x + drop(ARC(x, M)));  x2 = LN_mlp(x1 + drop(MLP(x1)));  M' = LN_state(ARC state)
    heavyball: x1 = x + drop(ARC(x, M));           x2 = RMSNorm_mlp(x1 + drop(MLP(x1)));  M' = ARC state
    (flags attn_norm, state_norm, mlp_norm select each piece)."""

    config: OmConfig
    layer_num: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.attn = ARC(cfg, self.layer_num, self.dtype, self.param_dtype)
        self.mlp = OmMLP(cfg, self.dtype, self.param_dtype)
        if cfg.attn_norm:
            self.attn_norm = _layer_norm(cfg, self.dtype, self.param_dtype, "attn_norm")
        if cfg.state_norm:
            self.state_norm = _layer_norm(cfg, self.dtype, self.param_dtype, "state_norm")
        if cfg.mlp_norm == "layernorm":
            self.mlp_norm = _layer_norm(cfg, self.dtype, self.param_dtype, "mlp_norm")
        else:
            self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps, ("norm",), self.dtype, self.param_dtype)
        self.attn_drop = nn.Dropout(cfg.attn_dropout)
        self.mlp_drop = nn.Dropout(cfg.hidden_dropout)

    def initial_state(self):
        """The learned initial state [1, S, D] of this layer."""
        return self.attn.initial_state()

    def __call__(self, x, state, deterministic=True, return_kv=False):
        res = self.attn(x, state, deterministic, return_kv)
        x = self._block(x, res[0], deterministic)
        m_new = self._norm_state(res[1])
        return (x, m_new, res[2]) if return_kv else (x, m_new)

    def _block(self, x, y, deterministic=True):
        """The rest of the layer after ARC: residual, norms, MLP."""
        x = x + self.attn_drop(y, deterministic=deterministic)
        if self.config.attn_norm:
            x = self.attn_norm(x)
        return self.mlp_norm(x + self.mlp_drop(self.mlp(x), deterministic=deterministic))

    def _norm_state(self, m):
        return self.state_norm(m) if self.config.state_norm else m

    # cached decoding (ARC.start_kv / decode_row / end_state)
    def start_kv(self, state, kv):
        return self.attn.start_kv(state, kv)

    def decode_row(self, x, i, kv):
        """x [b, 1, D] = segment row i [b] -> (x' [b, 1, D], kv)."""
        y, kv = self.attn.decode_row(x, i, kv)
        return self._block(x, y), kv

    def end_state(self, state, kv):
        return self._norm_state(self.attn.end_state(state, kv))


def _segment_step(mdl, carry, xs, deterministic, return_hidden):
    """Scan body: one segment through every layer. carry = (states: tuple of [b, S, D], out [b, n L, .]);
    xs = (tokens [b, L + d] or h [b, L, D], complete [b] bool, segment index k). Writes the segment's logits
    [b, L, V] f32 (or hidden [b, L, D]) into rows k L .. k L + L - 1 of `out` in place: the output buffer is the
    scan's carry, so no [n, b, L, .] stack is transposed into it afterwards (temporaries stay per segment)."""
    states, out = carry
    inp, complete, k = xs
    h = mdl._segment_input(inp) if mdl.ngram_scope == "segment" else inp
    new_states = []
    for layer, st in zip(mdl.layers, states):
        h, st_new = layer(h, st, deterministic, False)  # every argument positional: remat marks the last two static
        new_states.append(jnp.where(complete[:, None, None], st_new.astype(st.dtype), st))
    y = h if return_hidden else mdl._head(h)
    zero = jnp.zeros((), jnp.int32)
    out = jax.lax.dynamic_update_slice(out, y.astype(out.dtype), (zero, (k * y.shape[1]).astype(jnp.int32), zero))
    return (tuple(new_states), out), None


class OmForCausalLM(nn.Module):
    """See the module docstring. `model = OmForCausalLM(config, dtype=, param_dtype=, remat=False)`."""

    config: OmConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    ngram_scope: str = "segment"

    # Om reads one stream in fixed segments: packed documents are not separated (as upstream trains).
    accepts_segment_ids: ClassVar[bool] = False

    def setup(self):
        cfg = self.config
        if self.ngram_scope not in NGRAM_SCOPES:
            raise ValueError(f"OmForCausalLM.ngram_scope={self.ngram_scope!r}; expected one of {NGRAM_SCOPES}")
        self.embedder = embedding(cfg, self.dtype, self.param_dtype)
        self.ngram_embs = [NGramEmbedding(cfg.hidden_size, k, self.dtype, self.param_dtype)
                           for k in cfg.ngram_sizes]
        layer_cls = nn.remat(ARCformer, static_argnums=(3, 4)) if self.remat else ARCformer
        self.layers = [layer_cls(cfg, i, self.dtype, self.param_dtype) for i in range(cfg.num_hidden_layers)]
        if not cfg.tie_word_embeddings:
            self.proj_out = _linear(cfg.vocab_size, cfg.hidden_size, ("embed", "vocab"), False, self.dtype,
                                    self.param_dtype, "proj_out")

    # ---------------------------------------------------------------------------------------------- pieces
    def _segment_input(self, tokens):
        """tokens [b, W] (d look-back tokens first) -> h [b, W - d, D]: embeddings + n-gram features."""
        cfg = self.config
        e = self.embedder(tokens)
        if cfg.zero_pad_embeddings and cfg.pad_token_id is not None:
            e = e * (tokens != cfg.pad_token_id)[..., None].astype(e.dtype)
        return ngram_features(e, self.ngram_embs, cfg.ngram_sizes)

    def _head(self, h):
        if self.config.tie_word_embeddings:
            return self.embedder.attend(h).astype(jnp.float32)
        return self.proj_out(h).astype(jnp.float32)

    def _scan(self, stream, complete, states, deterministic, return_hidden):
        """stream [b, d + n L] tokens, complete [n, b] -> (states, out [b, n L, .])."""
        cfg = self.config
        L, d = cfg.segment_len, cfg.context_len
        n = complete.shape[0]
        if self.ngram_scope == "segment":
            idx = jnp.arange(n)[:, None] * L + jnp.arange(L + d)[None, :]          # [n, L + d]
            xs_in = jnp.moveaxis(stream[:, idx], 1, 0)                            # [n, b, L + d]
        else:
            h = self._segment_input(stream)                                       # [b, n L, D]
            xs_in = jnp.moveaxis(h.reshape(h.shape[0], n, L, h.shape[-1]), 1, 0)
        width = cfg.hidden_size if return_hidden else cfg.vocab_size
        out = jnp.zeros((stream.shape[0], n * L, width), self.dtype if return_hidden else jnp.float32)
        scan = nn.scan(lambda mdl, c, x: _segment_step(mdl, c, x, deterministic, return_hidden),
                       variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                       in_axes=0, out_axes=0, length=n)
        (states, out), _ = scan(self, (states, out), (xs_in, complete, jnp.arange(n, dtype=jnp.int32)))
        return states, out

    # ---------------------------------------------------------------------------------------------- call
    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, segment_ids=None,
                 deterministic=True, output_router_logits=None, return_hidden=False):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if segment_ids is not None:
            raise ValueError("OmForCausalLM takes no segment_ids (accepts_segment_ids = False): Om reads one "
                             "stream in fixed segments; packed documents are not separated (as upstream trains)")
        b, s = input_ids.shape
        L, d, fill = cfg.segment_len, cfg.context_len, cfg.context_token_id
        input_ids = input_ids.astype(jnp.int32)
        return_hidden = bool(return_hidden) and not self.is_initializing()
        init = [layer.initial_state() for layer in self.layers]                  # each [1, S, D]
        if cache is not None and "kv" in cache and s == 1 and attention_mask is None and not return_hidden:
            return self._decode(input_ids, cache, init)

        if cache is None and attention_mask is None:
            # the whole sequence from the start: [pads (d) | ids | fill], segments of L
            n = -(-s // L)
            stream = jnp.concatenate([jnp.full((b, d), fill, jnp.int32), input_ids,
                                      jnp.full((b, n * L - s), fill, jnp.int32)], axis=1)
            complete = jnp.broadcast_to((jnp.arange(1, n + 1) * L <= s)[:, None], (n, b))
            states = tuple(jnp.broadcast_to(m, (b,) + m.shape[1:]).astype(self.dtype) for m in init)
            _, out = self._scan(stream, complete, states, deterministic, return_hidden)
            return out[:, :s], None

        # general path: per-row streams (cache continuation and/or masked tokens dropped)
        if cache is None:
            count = jnp.zeros((b,), jnp.int32)
            segments = jnp.zeros((b,), jnp.int32)
            context = jnp.full((b, d), fill, jnp.int32)
            partial = jnp.full((b, L), fill, jnp.int32)
            states = tuple(jnp.broadcast_to(m, (b,) + m.shape[1:]).astype(self.dtype) for m in init)
            cap = s
        else:
            count, segments = cache["count"].astype(jnp.int32), cache["segments"].astype(jnp.int32)
            context, partial = cache["context"].astype(jnp.int32), cache["tokens"].astype(jnp.int32)
            fresh = (segments == 0)[:, None, None]
            states = tuple(jnp.where(fresh, m.astype(self.dtype), cache["states"][i].astype(self.dtype))
                           for i, m in enumerate(init))
            cap = L - 1 + s
        n = max(1, -(-cap // L))
        mask = jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        dest = count[:, None] + jnp.cumsum(mask, axis=1) - 1                        # stream slot of each token
        dest_w = jnp.where(mask > 0, dest, n * L)                                   # dropped tokens: out of range
        slot = jnp.arange(n * L)[None, :]
        comb = jnp.where(slot < count[:, None],
                         jnp.take_along_axis(partial, jnp.minimum(slot, L - 1).astype(jnp.int32) +
                                             jnp.zeros((b, 1), jnp.int32), axis=1), fill)
        comb = comb.at[jnp.arange(b)[:, None], dest_w].set(input_ids, mode="drop")
        total = count + jnp.sum(mask, axis=1)                                       # [b] stream tokens
        stream = jnp.concatenate([context, comb, jnp.full((b, L), fill, jnp.int32)], axis=1)
        complete = jnp.arange(1, n + 1)[:, None] * L <= total[None, :]               # [n, b]
        states, out = self._scan(stream[:, :d + n * L], complete, states, deterministic, return_hidden)
        out = jnp.take_along_axis(out, jnp.clip(dest, 0, n * L - 1)[..., None], axis=1)   # [b, s, .]

        new_cache = None
        if cache is not None:
            q = total // L                                                          # segments completed now
            new_count = total - q * L
            ctx_idx = (q * L)[:, None] + jnp.arange(d)[None, :]
            part_idx = (d + q * L)[:, None] + jnp.arange(L)[None, :]
            new_partial = jnp.where(jnp.arange(L)[None, :] < new_count[:, None],
                                    jnp.take_along_axis(stream, part_idx, axis=1), fill)
            new_cache = {"states": jnp.stack(states).astype(cache["states"].dtype),
                         "context": jnp.take_along_axis(stream, ctx_idx, axis=1),
                         "tokens": new_partial, "count": new_count, "segments": segments + q}
            if "kv" in cache:  # the K/V of the new partial segment's rows, for cached decoding
                new_cache["kv"] = self._capture_kv(new_cache["context"], new_partial, states,
                                                    jax.tree_util.tree_leaves(cache["kv"])[0].dtype)
                new_cache["kv_valid"] = jnp.ones((b,), bool)
        return out, new_cache

    # ---------------------------------------------------------------------------------------------- cached decode
    def _capture_kv(self, context, partial, states, dtype):
        """Per layer and pass the K/V of the leading state rows and the segment rows of the partial segment
        [context | partial] (rows past its length are never attended to, and overwritten as tokens come)."""
        h = self._segment_input(jnp.concatenate([context, partial], axis=1))
        kv = []
        for layer, st in zip(self.layers, states):
            h, _, layer_kv = layer(h, st, True, True)
            kv.append(jax.tree_util.tree_map(lambda t: t.astype(dtype), layer_kv))
        return tuple(kv)

    def _decode(self, tok, cache, init):
        """One token per row (s = 1) against the per-pass K/V cache: the token's row of its segment through every
        layer (O(S + L) attention per pass), the leading state rows' K/V when a segment starts, the trailing state
        rows (the next state) when it completes. Equals recomputing the segment (tests/test_om.py)."""
        cfg = self.config
        L, d, fill = cfg.segment_len, cfg.context_len, cfg.context_token_id
        b = tok.shape[0]
        count, segments = cache["count"].astype(jnp.int32), cache["segments"].astype(jnp.int32)
        context, partial = cache["context"].astype(jnp.int32), cache["tokens"].astype(jnp.int32)
        fresh = (segments == 0)[:, None, None]
        states = [jnp.where(fresh, m.astype(self.dtype), cache["states"][i].astype(self.dtype))
                  for i, m in enumerate(init)]
        kv, valid = cache["kv"], cache["kv_valid"]

        def start(mdl, kv):
            new = tuple(layer.start_kv(st, layer_kv) for layer, st, layer_kv in zip(mdl.layers, states, kv))
            keep = lambda n, o: jnp.where(valid.reshape((b,) + (1,) * (o.ndim - 1)), o, n)
            return jax.tree_util.tree_map(keep, new, kv)

        kv = nn.cond(jnp.all(valid), lambda mdl, kv: kv, start, self, kv)
        stream = jnp.concatenate([context, partial], axis=1)                       # [b, d + L]
        window = jnp.concatenate([jnp.take_along_axis(stream, count[:, None] + jnp.arange(d)[None, :], axis=1),
                                  tok], axis=1)                                    # d look-back + the token
        h = self._segment_input(window)                                            # [b, 1, D]
        new_kv = []
        for layer, layer_kv in zip(self.layers, kv):
            h, layer_kv = layer.decode_row(h, count, layer_kv)
            new_kv.append(layer_kv)
        logits = self._head(h)
        complete = count + 1 == L
        partial = jnp.where(jnp.arange(L)[None, :] == count[:, None], tok, partial)

        def end(mdl, states):
            new = [layer.end_state(st, layer_kv) for layer, st, layer_kv in zip(mdl.layers, states, new_kv)]
            return [jnp.where(complete[:, None, None], n.astype(o.dtype), o) for n, o in zip(new, states)]

        states = nn.cond(jnp.any(complete), end, lambda mdl, states: states, self, states)
        last = partial[:, L - d:]
        new_cache = {"states": jnp.stack(states).astype(cache["states"].dtype),
                     "context": jnp.where(complete[:, None], last, context),
                     "tokens": jnp.where(complete[:, None], fill, partial),
                     "count": jnp.where(complete, 0, count + 1),
                     "segments": segments + complete.astype(jnp.int32),
                     "kv": tuple(new_kv), "kv_valid": ~complete}
        return logits, new_cache

    @staticmethod
    def lm_head_weight(config: OmConfig, params):
        """-> (weight, layout): the untied head kernel [D, V] ("dv") or the tied embedding [V, D] ("vd")."""
        if config.tie_word_embeddings:
            return params["embedder"]["embedding"], "vd"
        return params["proj_out"]["kernel"], "dv"


# ------------------------------------------------------------------------------------------------ family functions
def init_cache(config: OmConfig, batch: int, max_length: int = 0, dtype=jnp.float32, kind: str = "full",
               multiple_of: int = 1):
    """The empty Om cache for `batch` rows (see the module docstring). Its size does not depend on max_length,
    kind or multiple_of (accepted for the family contract): O(NL (S D + H (S + L) sum_p (dk_p + dv_p))) per row
    for any length (the K/V of one segment, in `dtype`: f32 decodes exactly as recomputation)."""
    if kind not in ("full", "bounded", "auto"):
        raise ValueError(f"init_cache: kind={kind!r}; expected 'full', 'bounded' or 'auto' (all the same for Om)")
    c = config
    fill = c.context_token_id
    rows = c.state_len + c.segment_len
    kv = tuple(tuple((jnp.zeros((batch, c.num_attention_heads, rows, dk), dtype),
                      jnp.zeros((batch, c.num_attention_heads, rows, dv), dtype))
                     for dk, dv in zip(c.dims_key, c.dims_value)) for _ in range(c.num_hidden_layers))
    return {"states": jnp.zeros((c.num_hidden_layers, batch, c.state_len, c.hidden_size), dtype),
            "context": jnp.full((batch, c.context_len), fill, jnp.int32),
            "tokens": jnp.full((batch, c.segment_len), fill, jnp.int32),
            "count": jnp.zeros((batch,), jnp.int32),
            "segments": jnp.zeros((batch,), jnp.int32),
            "kv": kv, "kv_valid": jnp.zeros((batch,), bool)}


def _init_fn(config: OmConfig, param_dtype):
    return init_fn(OmForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype), seq_len=1)


def init_params(config: OmConfig, rng, param_dtype=jnp.float32):
    """Random params with the upstream initialisers (om_arc.md §2.7, §4.1, §5.1): a plain nested dict."""
    return random_params(_init_fn(config, param_dtype), rng)


def param_logical_axes(config: OmConfig):
    """Same structure as the params; each leaf a tuple of logical axis names."""
    return logical_axes(_init_fn(config, jnp.float32))


def describe(config: OmConfig) -> str:
    c = config
    return (f"{c.num_hidden_layers} ARCformer layers ({c.branch}), d={c.hidden_size}, {c.num_attention_heads} heads, "
            f"{c.num_passes} passes dk={list(c.dims_key)}, segment {c.segment_len} + state {c.state_len}, "
            f"n-grams {list(c.ngram_sizes)}, rope={c.rope}")


FAMILY = Family(name="om", config_cls=OmConfig, model_cls=OmForCausalLM, init_params=init_params,
                param_logical_axes=param_logical_axes, init_cache=init_cache, describe=describe)
