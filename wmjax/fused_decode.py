"""Decode-specialized Doge step for `wmjax.sampling.generate(decode="fused")` (experimental, off by default).

A functional copy of the Doge layer math for one token per row, shaped for decode (dense Doge with a full KV
cache no longer than keep_window_size, so every visible key is kept and there is no per-step top-k):

- q/k/v projections as one matmul and gate/up as one (`prepare_decode_params` concatenates the kernels once per
  `generate` call, inside the jit, before the loop; the params keep their HF names);
- RoPE and the visibility mask computed once per step for all layers;
- attention of the new token over one layer of a layer-stacked cache (`stack_decode_cache`): kv
  [layers, b, C, 2, G, D], bias [layers, b, G, C], with the new key/value/bias as separate inputs
  (`pallas_kernels.decode` or its jnp reference), and every layer's new entries written by one update per step.

Same math as the model's decode step (`wmjax.sampling.decode_step`); tests/test_sampling.py checks logits and
tokens against it. Why it is not the default: on an H100 (Doge-160M, bf16) its XLA part costs ~20% less device
time than the model's decode step, but its Pallas attention kernel measured 22 us (bs 16) to 224 us (bs 1) per
layer, so the whole step was slower (docs/BENCHMARKS.md, Sampling). `attention="reference"` runs the attention in
XLA instead (not yet measured on a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wmjax.config import DogeConfig
from wmjax.layers.norm import rms_norm

__all__ = ["fused_decode_supported", "prepare_decode_params", "stack_decode_cache", "fused_decode_step",
           "DECODE_ATTENTION_IMPLS"]

DECODE_ATTENTION_IMPLS = ("pallas", "reference", "interpret")


_DECODE_BLOCK = 64  # cache slots per block of the decode attention kernel; the stacked cache is padded to it


def fused_decode_supported(config, cache_kind: str, cache_length: int) -> bool:
    """Whether `fused_decode_step` computes exactly what the model's decode step does for this setup: dense Doge
    (no MoE, attention layers only), full cache no longer than keep_window_size (every visible key is kept, so
    no per-step top-k), no sliding window, bias heads = kv heads (HF layout), power-of-two head_dim."""
    layer_types = getattr(config, "layer_types", None)
    d = config.head_dim
    return (isinstance(config, DogeConfig) and not config.is_moe and cache_kind == "full" and config.sliding_window is None
            and (layer_types is None or all(t == "attention" for t in layer_types))
            and config.num_bias_heads == config.num_key_value_heads and d & (d - 1) == 0
            and cache_length <= config.keep_window_size)


def prepare_decode_params(config, params, dtype):
    """Per layer: the q/k/v kernels concatenated into one [hidden, (H + 2G) D] kernel and gate/up into one
    [hidden, 2F] kernel (in the compute dtype, as nn.Dense casts them), plus the small params as they are. Runs
    inside the jit, once per `generate` call (a copy of the projection weights), not per step."""
    m = params["model"]
    cast = lambda x: jnp.asarray(x).astype(dtype)
    layers = []
    for i in range(config.num_hidden_layers):
        lp = m[f"layers_{i}"]
        at, mlp = lp["self_attn"], lp["mlp"]
        qkv = [at["q_proj"], at["k_proj"], at["v_proj"]]
        gu = [mlp["gate_proj"], mlp["up_proj"]]
        layer = dict(
            input_norm=lp["input_layernorm"]["weight"], post_norm=lp["post_attention_layernorm"]["weight"],
            input_residual=lp["input_residual"], post_residual=lp["post_attention_residual"],
            qkv=(jnp.concatenate([cast(p["kernel"]) for p in qkv], axis=1)),
            o=(cast(at["o_proj"]["kernel"])), dt=(cast(at["dt_proj"]["kernel"])), A=at["A"],
            gate_up=(jnp.concatenate([cast(p["kernel"]) for p in gu], axis=1)),
            down=(cast(mlp["down_proj"]["kernel"])))
        if config.attention_bias:
            layer["qkv_bias"] = jnp.concatenate([cast(p["bias"]) for p in qkv])
            layer["o_bias"], layer["dt_bias"] = cast(at["o_proj"]["bias"]), cast(at["dt_proj"]["bias"])
        if config.mlp_bias:
            layer["gate_up_bias"] = jnp.concatenate([cast(p["bias"]) for p in gu])
            layer["down_bias"] = cast(mlp["down_proj"]["bias"])
        if config.qk_norm:
            layer["q_norm"], layer["k_norm"] = at["q_norm"]["weight"], at["k_norm"]["weight"]
        layers.append(layer)
    out = dict(embedding=m["embed_tokens"]["embedding"], norm=m["norm"]["weight"], layers=tuple(layers))
    if not config.tie_word_embeddings:
        out["lm_head"] = (cast(params["lm_head"]["kernel"]))
    return out


def stack_decode_cache(cache, block: int = _DECODE_BLOCK):
    """The model's full cache -> the fused decode state: kv [L, b, C', 2, G, D] (keys, values), bias
    [L, b, G, C'] f32, position / mask [b, C'] (identical in every layer: one copy), length; C' = C rounded up
    to `block` (the extra slots are never valid)."""
    layers = cache["layers"]
    c = layers[0].key.shape[1]
    pad = -c % block
    padc = lambda x, axis: jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    kv = jnp.stack([jnp.stack([lc.key, lc.value], axis=2) for lc in layers])
    bias = jnp.stack([lc.key_bias for lc in layers])
    return dict(kv=padc(kv, 2), bias=padc(bias, 3), position=padc(layers[0].key_position, 1),
                mask=padc(layers[0].key_mask, 1), length=cache["length"])


def _linear(x, kernel, bias=None):
    # nn.Dense with dtype = kernel.dtype (operands already in the compute dtype); kernel [in, out]
    y = jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def _decode_attention(q, k_new, v_new, bias_new, kv, bias, valid, *, layer, scale, implementation):
    from pallas_kernels.decode import decode_attention_pallas, decode_attention_reference
    if implementation in ("pallas", "interpret"):
        # the layer index as an operand: one compiled kernel for all layers (baked in, each layer launched its own
        # kernel variant, measured slow; see docs/BENCHMARKS.md)
        return decode_attention_pallas(q, k_new, v_new, bias_new, kv, bias, valid, layer=jnp.int32(layer),
                                       scale=scale, interpret=implementation == "interpret")
    return decode_attention_reference(q, k_new, v_new, bias_new, kv, bias, valid, layer=layer, scale=scale)


def fused_decode_step(config, dtype, fparams, state, tokens, positions, implementation=None):
    """One token per row ([b]) at `positions` [b] through the whole model, decode-specialized (see the module
    docstring); `fparams` from `prepare_decode_params`, `state` from `stack_decode_cache`.
    Returns (logits [b, V] f32, new state). implementation: "pallas" | "reference" | "interpret" (the kernel in
    Pallas interpret mode, for tests) | None (pallas on GPU, else reference)."""
    from wmjax.layers.rope import apply_rope, rope_cos_sin
    cfg = config
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation not in DECODE_ATTENTION_IMPLS:
        raise ValueError(f"fused_decode_step: implementation={implementation!r}; expected one of "
                         f"{DECODE_ATTENTION_IMPLS} or None")
    b = tokens.shape[0]
    h, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    r = h // g
    rp = max(16, 1 << (r - 1).bit_length()) if implementation in ("pallas", "interpret") else r
    eps, scale = cfg.rms_norm_eps, d ** -0.5
    kv, kbias, length = state["kv"], state["bias"], state["length"]
    cdt = kv.dtype
    emb = fparams["embedding"].astype(dtype)
    x = jnp.take(emb, tokens, axis=0)                                          # [b, hidden]
    cos, sin = rope_cos_sin(positions[:, None], d, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                            cfg.max_position_embeddings, dtype=dtype)          # [b, 1, d]
    # cached slots visible to this token (the token itself is handled by the attention separately)
    valid = (state["mask"] & (state["position"] <= positions[:, None])).astype(jnp.int32)
    new_k, new_v, new_b = [], [], []
    for li, lp in enumerate(fparams["layers"]):
        n = rms_norm(x, lp["input_norm"], eps, dtype)
        qkv = _linear(n, lp["qkv"], lp.get("qkv_bias"))
        q = qkv[:, :h * d].reshape(b, 1, h, d)
        k = qkv[:, h * d:(h + g) * d].reshape(b, 1, g, d)
        v = qkv[:, (h + g) * d:]                                               # [b, G D]
        if cfg.qk_norm:
            q = rms_norm(q, lp["q_norm"], eps, dtype)
            k = rms_norm(k, lp["k_norm"], eps, dtype)
        q = apply_rope(q, cos, sin)[:, 0]                                      # [b, H, d]
        k = apply_rope(k, cos, sin)[:, 0]                                      # [b, G, d]
        dt = _linear(v, lp["dt"], lp.get("dt_bias"))                           # [b, G]
        kb = jnp.exp(lp["A"].astype(jnp.float32) * jax.nn.softplus(dt.astype(jnp.float32)))
        k_c, v_c = k.astype(cdt), v.reshape(b, g, d).astype(cdt)
        qg = q.reshape(b, g, r, d)
        if rp != r:
            qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
        att = _decode_attention(qg, k_c, v_c, jnp.broadcast_to(kb[:, :, None], (b, g, rp)), kv, kbias, valid,
                                layer=li, scale=scale, implementation=implementation)
        att = att[:, :, :r].reshape(b, h * d)
        o = _linear(att, lp["o"], lp.get("o_bias"))
        x = lp["input_residual"].astype(dtype) * x + o
        m = rms_norm(x, lp["post_norm"], eps, dtype)
        gu = _linear(m, lp["gate_up"], lp.get("gate_up_bias"))
        f = cfg.intermediate_size
        ffn = _linear(jax.nn.silu(gu[:, :f]) * gu[:, f:], lp["down"], lp.get("down_bias"))
        x = lp["post_residual"].astype(dtype) * x + ffn
        new_k.append(k_c)
        new_v.append(v_c)
        new_b.append(kb)
    x = rms_norm(x, fparams["norm"], eps, dtype)
    if "lm_head" in fparams:
        logits = _linear(x, fparams["lm_head"])
    else:
        logits = jnp.dot(x, emb.T)
    # every layer's new entries, one update each: kv [L, b, 1, 2, G, D], bias [L, b, G, 1]
    upd = jnp.stack([jnp.stack(new_k), jnp.stack(new_v)], axis=2)[:, :, None]
    zero = jnp.zeros((), jnp.int32)
    new_state = dict(
        kv=jax.lax.dynamic_update_slice(kv, upd, (zero, zero, length, zero, zero, zero)),
        bias=jax.lax.dynamic_update_slice(kbias, jnp.stack(new_b)[..., None], (zero, zero, zero, length)),
        position=jax.lax.dynamic_update_slice(state["position"], positions[:, None].astype(jnp.int32),
                                              (zero, length)),
        mask=jax.lax.dynamic_update_slice(state["mask"], jnp.ones((b, 1), bool), (zero, length)),
        length=length + 1)
    return logits.astype(jnp.float32), new_state
