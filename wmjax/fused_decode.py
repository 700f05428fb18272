"""Decode-specialized Doge step for `wmjax.sampling.generate(decode="fused" | "fused_xla")`.

One token per row through the whole model in five kernels per layer (`pallas_kernels.decode`), where the Flax
model's decode step launches ~25 (measured on an H100: at batch 1 a decode step is bound by the number of small
dependent kernels, not by bytes; docs/BENCHMARKS.md, Sampling):

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
the projections run decode_linear's gemv form, and the attention may split the cache over programs with the split
results combined in the o projection's prologue; the attention kernel also pulls the next projections' weights
into L2 while it runs (`FusedDecodeOptions`).

The cache is per layer: keys / values [b, G, C, D] (C rounded up to the attention kernel's block), key bias
[b, G, C] f32, and one position / mask [b, C] shared by every layer (`decode_state_from_cache`).

Applies to dense Doge with a full cache no longer than keep_window_size (every visible key is kept, no per-step
top-k): `fused_decode_supported`. Same math as the model's decode step (`wmjax.sampling.decode_step`), with each
elementwise step rounded to the compute dtype as the model's jnp code; tests/test_sampling.py checks logits and
tokens against it. implementation "pallas" runs the kernels, "interpret" the kernels in Pallas interpret mode
(tests), "reference" their plain-jnp references (XLA; `decode="fused_xla"`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from wmjax.config import DogeConfig

__all__ = ["fused_decode_supported", "prepare_decode_params", "decode_state_from_cache", "fused_decode_step",
           "DECODE_IMPLS", "FusedDecodeOptions"]

DECODE_IMPLS = ("pallas", "reference", "interpret")

_ROWS = 16          # rows are padded to a multiple of this (tensor-core dots need M >= 16)
_CACHE_BLOCK = 128  # attention kernel's cache block (H100 bs 1: 10.7 us vs 12.6 at 64); caches padded to a multiple
_LOGITS_BLOCK = 64  # output columns per program of the LM head (vocab padded to a multiple of it)
_GEMV_BLOCK_N, _GEMV_LOGITS_BLOCK = 4, 8  # gemv form's output columns per program (projections, LM head)
_ATTENTION_PROGRAMS = 64                  # attention_splits=0: split until kv heads x splits reaches ~this


@dataclasses.dataclass(frozen=True)
class FusedDecodeOptions:
    """Kernel choices of `fused_decode_step` (implementation "pallas" / "interpret"); every choice computes the same
    math (tests/test_sampling.py). The defaults are the fastest measured on an H100 (docs/BENCHMARKS.md, Sampling).

    prefetch: the attention kernel gets extra programs that read the layer's o / gate / up / down weights and the
      next layer's q/k/v weights while the attention runs (at batch 1 it runs batch x kv heads programs on a
      132-SM GPU), so the projections after it find their weights in L2 instead of HBM.
    gemv: at batch 1, the projections in `decode_linear`'s gemv form on one row (else the dot form on 16 padded
      rows); gemv_warps: its warps per program (4 output columns per program, 8 for the LM head).
    attention_splits: at batch 1, cache-block splits per (row, kv head) of the attention (flash-decoding), combined
      in the o projection's prologue; 1 = none, 0 = as many as reach ~64 programs (`_attention_splits`); the largest
      divisor of the cache's block count <= the value is used. Above batch 1 the attention is not split."""
    prefetch: bool = True
    gemv: bool = True
    gemv_warps: int = 1
    attention_splits: int = 1

    def __post_init__(self):
        if self.gemv_warps not in (1, 2, 4, 8):
            raise ValueError(f"FusedDecodeOptions: gemv_warps={self.gemv_warps!r} must be 1, 2, 4 or 8")
        if type(self.attention_splits) is not int or self.attention_splits < 0:
            raise ValueError(f"FusedDecodeOptions: attention_splits={self.attention_splits!r} must be an int >= 0")

    @classmethod
    def parse(cls, text: str) -> "FusedDecodeOptions":
        """'prefetch=0 gemv=1 gemv_warps=4 attention_splits=3' (space-separated name=value; '' = the defaults)."""
        kw = {}
        for item in text.split():
            name, sep, value = item.partition("=")
            field = {f.name: f for f in dataclasses.fields(cls)}.get(name)
            if not sep or field is None:
                raise ValueError(f"FusedDecodeOptions.parse: {item!r} is not name=value with name one of "
                                 f"{[f.name for f in dataclasses.fields(cls)]}")
            kw[name] = bool(int(value)) if field.type in ("bool", bool) else int(value)
        return cls(**kw)


def _attention_splits(batch: int, kv_heads: int, n_blocks: int, requested: int = 0) -> int:
    """Cache-block splits per (row, kv head) for the decode attention: 1 above batch 1 (batch x kv heads programs
    already; the combine would read [splits, 16 padded rows, H D] partials in every o-projection program); at batch
    1 the largest divisor of n_blocks <= requested (0: ceil(_ATTENTION_PROGRAMS / kv_heads))."""
    if batch != 1:
        return 1
    target = min(n_blocks, requested or -(-_ATTENTION_PROGRAMS // kv_heads))
    return max(s for s in range(1, target + 1) if n_blocks % s == 0)


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


def prepare_decode_params(config, params, dtype):
    """The model's params -> the decode kernels' operands: per layer the q/k/v kernels concatenated and
    transposed to [(H + 2G) D, hidden], o [hidden, H D], gate / up [F, hidden], down [hidden, F], dt_proj
    transposed to [G, G D] (all in the compute dtype, as nn.Dense casts them), norms, residual scales, A, biases;
    the LM head [V', hidden] (the tied embedding or the untied head, transposed; V' = vocab rounded up to the
    head's block). Runs inside the jit, once per `generate` call, before the decode loop."""
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
            dt=t(at["dt_proj"]["kernel"]), A=at["A"], gate=t(mlp["gate_proj"]["kernel"]),
            up=t(mlp["up_proj"]["kernel"]), down=t(mlp["down_proj"]["kernel"]),
            q_norm=at["q_norm"]["weight"] if config.qk_norm else ones,
            k_norm=at["k_norm"]["weight"] if config.qk_norm else ones)
        if config.attention_bias:
            layer["qkv_bias"] = jnp.concatenate([cast(p["bias"]) for p in qkv])
            layer["o_bias"], layer["dt_bias"] = cast(at["o_proj"]["bias"]), cast(at["dt_proj"]["bias"])
        if config.mlp_bias:
            layer["gate_bias"], layer["up_bias"] = cast(mlp["gate_proj"]["bias"]), cast(mlp["up_proj"]["bias"])
            layer["down_bias"] = cast(mlp["down_proj"]["bias"])
        layers.append(layer)
    head = (cast(m["embed_tokens"]["embedding"]) if config.tie_word_embeddings
            else t(params["lm_head"]["kernel"]))
    head = jnp.pad(head, ((0, -head.shape[0] % _LOGITS_BLOCK), (0, 0)))
    return dict(embedding=cast(m["embed_tokens"]["embedding"]), norm=m["norm"]["weight"], lm_head=head,
                layers=tuple(layers))


def decode_state_from_cache(cache, block: int = _CACHE_BLOCK):
    """The model's full cache (after prefill) -> the fused decode state: per layer keys / values
    [b, G, C', D] and key bias [b, G, C'] f32, one position / mask [b, C'] (identical in every layer), length;
    C' = C rounded up to `block` (the extra slots are never valid)."""
    layers = cache["layers"]
    pad = -layers[0].key.shape[1] % block
    padc = lambda x, axis: jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    return dict(keys=tuple(padc(lc.key.transpose(0, 2, 1, 3), 2) for lc in layers),
                values=tuple(padc(lc.value.transpose(0, 2, 1, 3), 2) for lc in layers),
                biases=tuple(padc(lc.key_bias, 2) for lc in layers),
                position=padc(layers[0].key_position, 1), mask=padc(layers[0].key_mask, 1),
                length=cache["length"])


def fused_decode_step(config, dtype, fparams, state, tokens, positions, implementation=None,
                      options: FusedDecodeOptions | None = None):
    """One token per row (tokens [b]) at `positions` [b] through the whole model (see the module docstring);
    `fparams` from `prepare_decode_params`, `state` from `decode_state_from_cache`.
    Returns (logits [b, V] f32, new state). implementation: "pallas" | "reference" | "interpret" | None (pallas
    on GPU, else reference). options: the kernels' choices (FusedDecodeOptions(); the reference ignores them)."""
    from pallas_kernels.decode import (decode_layer_attention, decode_layer_attention_reference, decode_linear,
                                       decode_linear_reference)
    from wmjax.layers.rope import rope_cos_sin
    cfg = config
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "reference"
    if implementation not in DECODE_IMPLS:
        raise ValueError(f"fused_decode_step: implementation={implementation!r}; expected one of {DECODE_IMPLS} "
                         "or None")
    if implementation == "reference":
        linear, gemv = decode_linear_reference, False

        def attention(*args, prefetch=(), **kw):  # the reference reads no weights ahead
            return decode_layer_attention_reference(*args, **kw)
    else:
        interpret = implementation == "interpret"
        opts = FusedDecodeOptions() if options is None else options
        gemv = tokens.shape[0] == 1 and opts.gemv

        def linear(x, w, **kw):
            # blocks from `bench/sample.py --decode-kernels` on an H100 (docs/BENCHMARKS.md, Sampling): dot form 16
            # output columns per program, 32 for the two-weight SwiGLU projection, 4 warps; gemv form (batch 1) 4, 8
            # for the LM head. K in chunks of 256 through the kernel's fori_loop with 3 pipeline stages (0.2-1.2 us
            # less per call than 1 stage on the H100)
            block_n = kw.pop("block_n", 32 if "up_weight" in kw else 16)
            warps = 4
            if gemv:
                block_n = _GEMV_LOGITS_BLOCK if block_n == _LOGITS_BLOCK else _GEMV_BLOCK_N
                kw["real_rows"], warps = 1, opts.gemv_warps
            else:
                block_n = _block(w.shape[0], block_n)
            return decode_linear(x, w, block_n=block_n, block_k=256, num_warps=warps, num_stages=3,
                                 interpret=interpret, **kw)

        b_, g_, c_, _ = state["keys"][0].shape  # the same for every layer
        splits = _attention_splits(b_, g_, c_ // _CACHE_BLOCK, opts.attention_splits)

        def attention(*args, prefetch=(), **kw):
            return decode_layer_attention(*args, block_c=_CACHE_BLOCK, num_stages=3, interpret=interpret,
                                          num_splits=splits, prefetch=prefetch if opts.prefetch else (), **kw)
    b = tokens.shape[0]
    rows = 1 if gemv else -(-b // _ROWS) * _ROWS
    d, eps = cfg.head_dim, cfg.rms_norm_eps
    x = jnp.take(fparams["embedding"], jnp.pad(tokens, (0, rows - b)), axis=0)                # [rows, hidden]
    cos, sin = rope_cos_sin(positions[:, None], d, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                            cfg.max_position_embeddings, dtype=dtype)
    cos, sin = cos[:, 0], sin[:, 0]                                                            # [b, D]
    # cached slots visible to this token (the token itself is handled inside the attention)
    valid = (state["mask"] & (state["position"] <= positions[:, None])).astype(jnp.int32)
    slot = state["length"]
    keys, values, biases = list(state["keys"]), list(state["values"]), list(state["biases"])
    layers = fparams["layers"]
    for li, lp in enumerate(layers):
        qkv = linear(x, lp["qkv"], norm_weight=lp["input_norm"], eps=eps, bias=lp.get("qkv_bias"))
        # the weights read after this attention, pulled into L2 while it runs (FusedDecodeOptions.prefetch)
        prefetch = (lp["o"], lp["gate"], lp["up"], lp["down"]) + (
            (layers[li + 1]["qkv"],) if li + 1 < len(layers) else ())
        att, keys[li], values[li], biases[li] = attention(
            qkv, cos, sin, valid, slot, lp["q_norm"], lp["k_norm"], lp["dt"], lp.get("dt_bias"), lp["A"],
            keys[li], values[li], biases[li], num_heads=cfg.num_attention_heads, eps=eps, scale=d ** -0.5,
            qk_norm=cfg.qk_norm, prefetch=prefetch)
        att, att_lse = att if isinstance(att, tuple) else (att, None)     # split attention: (partials, lse)
        x = linear(att, lp["o"], bias=lp.get("o_bias"), residual=x, residual_scale=lp["input_residual"],
                   x_lse=att_lse)
        hid = linear(x, lp["gate"], up_weight=lp["up"], norm_weight=lp["post_norm"], eps=eps,
                     bias=lp.get("gate_bias"), up_bias=lp.get("up_bias"))
        x = linear(hid, lp["down"], bias=lp.get("down_bias"), residual=x, residual_scale=lp["post_residual"])
    head = fparams["lm_head"]
    extra = dict(block_n=_LOGITS_BLOCK) if implementation != "reference" else {}
    logits = linear(x, head, norm_weight=fparams["norm"], eps=eps, out_dtype=jnp.float32, **extra)
    zero = jnp.zeros((), jnp.int32)
    new_state = dict(
        keys=tuple(keys), values=tuple(values), biases=tuple(biases),
        position=jax.lax.dynamic_update_slice(state["position"], positions[:, None].astype(jnp.int32),
                                              (zero, slot)),
        mask=jax.lax.dynamic_update_slice(state["mask"], jnp.ones((b, 1), bool), (zero, slot)),
        length=slot + 1)
    return logits[:b, :cfg.vocab_size], new_state
