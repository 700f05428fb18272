"""Decode-specialized Doge step: the "fused" backend of the model's decode step (`wmjax.sampling.decode_step(...,
backend="fused")`, `generate(decode="fused")`).

One token per row through the whole model in five kernels per layer (`pallas_kernels.decode`), where the Flax
model's decode step launches ~25 (measured on an H100: at batch 1 a decode step is bound by the number of small
dependent kernels, not by bytes; docs/KERNELS.md, Decode):

    qkv  = rms_norm(x; input_norm) @ [W_q; W_k; W_v]^T                    decode_linear, RMSNorm prologue
    att, cache = attention(qkv, cache)      q/k RMSNorm, RoPE, dt_proj -> key bias, softmax over the cache and
                                            the new token, the new key/value/bias written in place
    x    = input_residual * x + att @ W_o^T                               decode_linear, residual epilogue
    hid  = silu(m @ W_gate^T) * (m @ W_up^T),  m = rms_norm(x; post_norm)  decode_linear, norm + SwiGLU
    x    = post_residual * x + hid @ W_down^T                             decode_linear, residual epilogue

and once per step the embedding gather, RoPE cos/sin, the visibility mask and the final norm + LM head (one more
decode_linear). The weights are stored [out, in] (each kernel program reads contiguous rows), transposed and
concatenated once per `generate` call inside the jit, before the decode loop (`prepare_decode_params`). Rows are
padded to a multiple of 16 (tensor-core dots); only the real rows touch the cache. At batch 1 there is one row:
the projections run decode_linear's gemv form. The attention kernel also pulls the next projections' weights into
L2 while it runs. Blocks, warps and stages: `pallas_kernels.decode.tuning`.

The decode state is the model's full cache (`wmjax.cache.KVCache` per layer: keys / values [b, G, C, D], key bias
[b, G, C] f32, positions / mask [b, C]), read and written in place by the attention kernel, so decoding takes over
from the model's prefill on the same cache; its capacity C must be a multiple of the attention kernel's block
(`init_cache(..., multiple_of=tuning.cache_block)`). The params are a `FusedParams` (`prepare_decode_params`).

Applies to dense Doge with a full cache no longer than keep_window_size (every visible key is kept, no per-step
top-k): `fused_decode_supported`. Same math as the model's decode step (`wmjax.sampling.decode_step`), with each
elementwise step rounded to the compute dtype as the model's jnp code; tests/test_sampling.py checks logits and
tokens against it. implementation "pallas" runs the kernels, "interpret" the kernels in Pallas interpret mode,
"reference" their plain-jnp references (XLA); None (`decode="fused"`) is "pallas" on GPU and
"interpret" elsewhere, so `generate` runs the kernels' code on a CPU too (tests).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.decode import (decode_layer_attention, decode_layer_attention_reference, decode_linear,
                                   decode_linear_reference)
from pallas_kernels.decode.tuning import DecodeTuning
from pallas_kernels.decode.tuning import current as current_tuning
from wmjax.config import DogeConfig
from wmjax.layers.rope import rope_cos_sin

__all__ = ["fused_decode_supported", "FusedLayerParams", "FusedParams", "prepare_decode_params", "fused_decode_step",
           "DECODE_IMPLS"]

DECODE_IMPLS = ("pallas", "reference", "interpret")

_ROWS = 16          # rows are padded to a multiple of this (tensor-core dots need M >= 16)


class FusedLayerParams(NamedTuple):
    """One layer's decode-kernel operands (weights [out, in] in the compute dtype; biases None where the config
    has none): qkv [(H + 2G) D, hidden], o [hidden, H D], gate / up [F, hidden], down [hidden, F], dt [G, G D],
    A [G], norms [hidden] / [D] (q/k norms are ones without qk_norm), residual scales [hidden]."""
    input_norm: jax.Array
    post_norm: jax.Array
    input_residual: jax.Array
    post_residual: jax.Array
    qkv: jax.Array
    o: jax.Array
    dt: jax.Array
    A: jax.Array
    gate: jax.Array
    up: jax.Array
    down: jax.Array
    q_norm: jax.Array
    k_norm: jax.Array
    qkv_bias: Optional[jax.Array] = None
    o_bias: Optional[jax.Array] = None
    dt_bias: Optional[jax.Array] = None
    gate_bias: Optional[jax.Array] = None
    up_bias: Optional[jax.Array] = None
    down_bias: Optional[jax.Array] = None


class FusedParams(NamedTuple):
    """The whole model's decode-kernel operands: embedding [V, hidden], final norm [hidden], LM head [V', hidden]
    (V' = vocab rounded up to the head's block), one `FusedLayerParams` per layer."""
    embedding: jax.Array
    norm: jax.Array
    lm_head: jax.Array
    layers: tuple


def fused_decode_supported(config, cache_kind: str, cache_length: int) -> bool:
    """Whether `fused_decode_step` computes exactly what the model's decode step does for this setup: dense Doge
    (no MoE, attention layers only), full cache no longer than keep_window_size (every visible key is kept, so
    no per-step top-k), no sliding window, bias heads = kv heads (HF layout), power-of-two head_dim, and
    hidden / ffn / heads x head_dim sizes that are multiples of 16 (the projection kernel's blocks)."""
    layer_types = getattr(config, "layer_types", None)
    d = config.head_dim
    return (isinstance(config, DogeConfig) and not config.is_moe and cache_kind == "full"
            and config.sliding_window is None
            and (layer_types is None or all(t == "attention" for t in layer_types))
            and config.num_bias_heads == config.num_key_value_heads and d >= 8 and d & (d - 1) == 0
            and all(n % 16 == 0 for n in (config.hidden_size, config.intermediate_size,
                                          config.num_attention_heads * d))
            and cache_length <= config.keep_window_size)


def _block(n: int, prefer: int) -> int:
    """The largest power of two <= prefer (and >= 16) dividing n."""
    blk = prefer
    while blk > 16 and n % blk:
        blk //= 2
    return blk


def prepare_decode_params(config, params, dtype, tuning: DecodeTuning | None = None):
    """The model's params -> the decode kernels' operands: per layer the q/k/v kernels concatenated and
    transposed to [(H + 2G) D, hidden], o [hidden, H D], gate / up [F, hidden], down [hidden, F] (in the compute
    dtype, as nn.Dense casts them), dt_proj transposed to [G, G D] and its bias in f32 (the model's dt_proj runs in
    f32), norms, residual scales, A, biases; the LM head [V', hidden] (the tied embedding or the untied head,
    transposed; V' = vocab rounded up to the head's block, `tuning.logits_block_n`). Runs inside the jit, once per `generate` call, before the decode loop."""
    tuning = current_tuning() if tuning is None else tuning
    m = params["model"]
    cast = lambda x: jnp.asarray(x).astype(dtype)
    t = lambda x: cast(x).T
    d = config.head_dim
    ones = jnp.ones((d,), dtype)
    layers = []
    for i in range(config.num_hidden_layers):
        lp = m[f"layers_{i}"]
        at, mlp = lp["self_attn"], lp["mlp"]
        qkv = [at["q_proj"], at["k_proj"], at["v_proj"]]
        layer = dict(
            input_norm=lp["input_layernorm"]["weight"], post_norm=lp["post_attention_layernorm"]["weight"],
            input_residual=lp["input_residual"], post_residual=lp["post_attention_residual"],
            qkv=jnp.concatenate([t(p["kernel"]) for p in qkv], axis=0), o=t(at["o_proj"]["kernel"]),
            dt=jnp.asarray(at["dt_proj"]["kernel"], jnp.float32).T, A=at["A"], gate=t(mlp["gate_proj"]["kernel"]),
            up=t(mlp["up_proj"]["kernel"]), down=t(mlp["down_proj"]["kernel"]),
            q_norm=at["q_norm"]["weight"] if config.qk_norm else ones,
            k_norm=at["k_norm"]["weight"] if config.qk_norm else ones)
        if config.attention_bias:
            layer["qkv_bias"] = jnp.concatenate([cast(p["bias"]) for p in qkv])
            layer["o_bias"], layer["dt_bias"] = (cast(at["o_proj"]["bias"]),
                                                jnp.asarray(at["dt_proj"]["bias"], jnp.float32))
        if config.mlp_bias:
            layer["gate_bias"], layer["up_bias"] = cast(mlp["gate_proj"]["bias"]), cast(mlp["up_proj"]["bias"])
            layer["down_bias"] = cast(mlp["down_proj"]["bias"])
        layers.append(FusedLayerParams(**layer))
    head = (cast(m["embed_tokens"]["embedding"]) if config.tie_word_embeddings
            else t(params["lm_head"]["kernel"]))
    head = jnp.pad(head, ((0, -head.shape[0] % tuning.logits_block_n), (0, 0)))
    return FusedParams(embedding=cast(m["embed_tokens"]["embedding"]), norm=m["norm"]["weight"], lm_head=head,
                       layers=tuple(layers))


def fused_decode_step(config, dtype, fparams, state, tokens, positions, implementation=None,
                      tuning: DecodeTuning | None = None):
    """One token per row (tokens [b]) at `positions` [b] through the whole model (see the module docstring);
    `fparams` a `FusedParams` (`prepare_decode_params`); `state` the model's full cache (`wmjax.cache.init_cache`,
    capacity a multiple of `tuning.cache_block`, e.g. after the model's prefill). Returns (logits [b, V] f32, new
    cache). implementation: "pallas" | "reference" | "interpret" | None (pallas on GPU, else interpret). tuning: the
    kernels' blocks / warps / stages (None: `pallas_kernels.decode.tuning`'s current values; the reference ignores
    them). This is the "fused" backend of `wmjax.sampling.decode_step`."""
    cfg = config
    tune = current_tuning() if tuning is None else tuning
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "interpret"
    if implementation not in DECODE_IMPLS:
        raise ValueError(f"fused_decode_step: implementation={implementation!r}; expected one of {DECODE_IMPLS} "
                         "or None")
    if implementation == "reference":
        gemv = False

        def linear(x, w, head=False, **kw):
            return decode_linear_reference(x, w, **kw)

        def attention(*args, prefetch=(), **kw):  # the reference reads no weights ahead
            return decode_layer_attention_reference(*args, **kw)
    else:
        interpret = implementation == "interpret"
        gemv = tokens.shape[0] == 1  # batch 1: the gemv form on one row

        def linear(x, w, head=False, **kw):
            if gemv:
                block_n = tune.gemv_logits_block_n if head else tune.gemv_block_n
                kw.update(real_rows=1)
            elif head:
                block_n = tune.logits_block_n
            else:
                block_n = _block(w.shape[0], tune.block_n_swiglu if "up_weight" in kw else tune.block_n)
            return decode_linear(x, w, block_n=block_n, block_k=tune.block_k,
                                 num_warps=tune.gemv_warps if gemv else tune.linear_warps,
                                 num_stages=tune.linear_stages, interpret=interpret, **kw)

        def attention(*args, **kw):
            return decode_layer_attention(*args, block_c=tune.cache_block, num_warps=tune.attention_warps,
                                          num_stages=tune.attention_stages, interpret=interpret, **kw)
    cache_layers = state["layers"]
    capacity = cache_layers[0].key.shape[2]
    if implementation != "reference" and capacity % tune.cache_block:
        raise ValueError(f"fused_decode_step: cache capacity {capacity} is not a multiple of the attention kernel's "
                         f"block {tune.cache_block}; build it with init_cache(..., multiple_of={tune.cache_block})")
    b = tokens.shape[0]
    rows = 1 if gemv else -(-b // _ROWS) * _ROWS
    d, eps = cfg.head_dim, cfg.rms_norm_eps
    x = jnp.take(fparams.embedding, jnp.pad(tokens, (0, rows - b)), axis=0)                   # [rows, hidden]
    cos, sin = rope_cos_sin(positions[:, None], d, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                            cfg.max_position_embeddings, dtype=dtype)
    cos, sin = cos[:, 0], sin[:, 0]                                                            # [b, D]
    # cached slots visible to this token (the token itself is handled inside the attention)
    # (every layer's positions / mask are the same: the model writes each token into every layer's same slot)
    valid = (cache_layers[0].key_mask & (cache_layers[0].key_position <= positions[:, None])).astype(jnp.int32)
    slot = state["length"]
    zero = jnp.zeros((), jnp.int32)
    new_position = positions[:, None].astype(jnp.int32)
    new_layers = []
    layers = fparams.layers
    for li, (lp, lc) in enumerate(zip(layers, cache_layers)):
        qkv = linear(x, lp.qkv, norm_weight=lp.input_norm, eps=eps, bias=lp.qkv_bias)
        # the weights read after this attention, pulled into L2 while it runs
        prefetch = (lp.o, lp.gate, lp.up, lp.down) + ((layers[li + 1].qkv,) if li + 1 < len(layers) else ())
        att, keys, values, biases = attention(
            qkv, cos, sin, valid, slot, lp.q_norm, lp.k_norm, lp.dt, lp.dt_bias, lp.A,
            lc.key, lc.value, lc.key_bias, num_heads=cfg.num_attention_heads, eps=eps, scale=d ** -0.5,
            qk_norm=cfg.qk_norm, prefetch=prefetch)
        new_layers.append(lc.replace(
            key=keys, value=values, key_bias=biases,
            key_position=jax.lax.dynamic_update_slice(lc.key_position, new_position, (zero, slot)),
            key_mask=jax.lax.dynamic_update_slice(lc.key_mask, jnp.ones((b, 1), bool), (zero, slot))))
        x = linear(att, lp.o, bias=lp.o_bias, residual=x, residual_scale=lp.input_residual)
        hid = linear(x, lp.gate, up_weight=lp.up, norm_weight=lp.post_norm, eps=eps, bias=lp.gate_bias,
                     up_bias=lp.up_bias)
        x = linear(hid, lp.down, bias=lp.down_bias, residual=x, residual_scale=lp.post_residual)
    logits = linear(x, fparams.lm_head, head=True, norm_weight=fparams.norm, eps=eps, out_dtype=jnp.float32)
    return logits[:b, :cfg.vocab_size], {"length": slot + 1, "layers": tuple(new_layers)}
