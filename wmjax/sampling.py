"""Jit-compiled sampling: one prefill over a ragged prompt batch, then a `lax.while_loop` decode.

    out = generate(model, params, prompts, max_new_tokens=64)                  # greedy
    out = generate(model, params, prompts, max_new_tokens=64, temperature=0.8, top_p=0.9, rng=jax.random.key(0))
    out.tokens [b, max_new_tokens] (stop token included, then pad_id), out.lengths [b], out.logprobs [b, T] | None

`prompts` is a list of token-id lists (ragged; padded here on `padding_side`) or an int array [b, s] with
`attention_mask` [b, s] (1 = real token; left or right padding, or any mix). Positions come from the mask
(cumsum - 1), as `transformers` does, so a row's logits do not depend on how it was padded.

Caches (wmjax.cache): cache="full" keeps every token (s + max_new_tokens slots), "bounded" keeps keep_window_size
slots per bias head (decode memory O(keep_window_size), same tokens as the full cache except for exact bias ties),
"auto" picks the smaller. All shapes are static: one compilation per (batch, padded prompt length,
max_new_tokens, cache kind, sampling settings).

Logits processing, in `transformers`' order: repetition penalty (over prompt + generated tokens: negative logits
times the penalty, positive ones divided), then, when sampling (temperature > 0), temperature, top-k, top-p,
min-p. temperature == 0 (the default) is greedy (argmax after the repetition penalty). `logprobs` are those of
the chosen tokens under the model's raw distribution (log_softmax of the unprocessed logits).

Stop tokens: `stop_tokens` = None (config.eos_token_id, if any), a list of ids for every row, or a list of lists
(one per row). A row stops after emitting a stop token (which is counted in its length); the loop ends when
every row has stopped or max_new_tokens were generated.

Decode path (`decode=`): "model" runs every decode step through the Flax model (`decode_step`); "fused" through
`fused_decode_step`, a decode-specialized functional copy of the Doge layer math for dense Doge with a full cache
that fits keep_window_size: q/k/v and gate/up projections as one matmul each (weights concatenated once per
`generate` call, before the loop, by `prepare_decode_params`; the params keep their HF names), RoPE and the
visibility mask computed once per step for all layers, the attention of the new token over one layer of a
layer-stacked cache (`pallas_kernels.decode` on GPU, its jnp reference elsewhere) with the new key/value/bias
as separate inputs, and every layer's new cache entries written by one update per step. Same math as the model
path (tests/test_sampling.py checks the logits). "auto" (default) is "model" for now: on an H100 (Doge-160M,
bf16) the fused path's XLA part costs ~20% less device time than the model's decode step, but its Pallas
attention kernel runs 22 us (bs 16) to 224 us (bs 1) per layer, so the whole fused step was slower (see
docs/BENCHMARKS.md, Sampling). `WMJAX_DECODE_ATTENTION=reference` runs the fused path's attention in XLA instead.

Streaming: `callback(step, tokens [b] np.int32, active [b] np.bool)` is called on the host once per generated
token position (through `jax.debug.callback`; `active` is False for rows already stopped before this step).
It is an ordered effect (calls arrive in step order) and syncs the device each step, so leave it out when
measuring throughput.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from wmjax.cache import init_cache
from wmjax.config import DogeConfig

__all__ = ["SamplingParams", "GenerateOutput", "generate", "process_logits", "prefill", "decode_step",
           "pad_prompts", "positions_from_mask", "fused_decode_supported", "prepare_decode_params",
           "stack_decode_cache", "fused_decode_step"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    def validate(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [b, max_new_tokens] int32; after a row stops: pad_id
    lengths: jax.Array  # [b] int32: generated tokens per row (stop token included)
    logprobs: Optional[jax.Array]  # [b, max_new_tokens] f32 (0 after the row stopped) or None
    steps: jax.Array  # int32 scalar: positions generated (max over rows)


# ---------------------------------------------------------------------------------------------------- helpers
def positions_from_mask(mask):
    """Positions of real tokens counted from each row's first real token (pads get the previous position)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, padding_side: str = "left", multiple_of: int = 1):
    """Ragged token lists -> (ids [b, s] int32, mask [b, s] int32); s rounded up to `multiple_of`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    if len(prompts) == 0:
        raise ValueError("generate: empty prompt batch (no rows)")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError(f"generate: empty prompt in row {lens.index(0)}: every prompt needs at least one token "
                         "(e.g. a BOS token)")
    s = -(-max(lens) // multiple_of) * multiple_of
    ids = np.full((len(prompts), s), pad_id, np.int32)
    mask = np.zeros((len(prompts), s), np.int32)
    for i, p in enumerate(prompts):
        sl = slice(s - len(p), s) if padding_side == "left" else slice(0, len(p))
        ids[i, sl] = np.asarray(p, np.int32)
        mask[i, sl] = 1
    return ids, mask


def process_logits(logits, sp: SamplingParams, seen=None):
    """Repetition penalty then (if sampling) temperature, top-k, top-p, min-p. logits [b, V] f32 -> [b, V] f32,
    removed tokens at -inf. `seen` [b, V] bool: tokens already in the sequence (for the repetition penalty)."""
    logits = logits.astype(jnp.float32)
    if sp.repetition_penalty != 1.0 and seen is not None:
        pen = jnp.where(logits < 0, logits * sp.repetition_penalty, logits / sp.repetition_penalty)
        logits = jnp.where(seen, pen, logits)
    if sp.greedy:
        return logits
    logits = logits / sp.temperature
    neg = -jnp.inf
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sp.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sp.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (HF: drop tokens whose ascending
        # cumulative probability is <= 1 - top_p; the most likely token is always kept)
        k = min(sp.top_k, logits.shape[-1]) if sp.top_k else logits.shape[-1]
        srt = jax.lax.top_k(logits, k)[0]  # descending
        probs = jax.nn.softmax(srt, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sp.top_p
        keep = keep.at[..., 0].set(True)
        thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < thresh, neg, logits)
    if sp.min_p > 0.0:
        probs = jax.nn.softmax(logits, axis=-1)
        top = jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < sp.min_p * top, neg, logits)
    return logits


def _choose(raw_logits, sp: SamplingParams, seen, key):
    proc = process_logits(raw_logits, sp, seen)
    if sp.greedy:
        tok = jnp.argmax(proc, axis=-1)
    else:
        tok = jax.random.categorical(key, proc, axis=-1)
    return tok.astype(jnp.int32)


def _cache_kind(kind: str, config, total: int) -> str:
    if kind == "auto":
        if config.sliding_window is not None or total <= config.keep_window_size:
            return "full"
        # bounded: w slots per bias head (bias heads >= kv heads) vs total slots per kv head
        per_tok_full = config.num_key_value_heads
        per_tok_bounded = config.num_bias_heads * config.keep_window_size / total
        return "bounded" if per_tok_bounded < per_tok_full else "full"
    if kind not in ("full", "bounded"):
        raise ValueError(f"cache={kind!r}; expected 'auto', 'full' or 'bounded'")
    return kind


# ---------------------------------------------------------------------------------------------------- model steps
def prefill(model, params, input_ids, attention_mask, cache):
    """Run the padded prompt batch through the model into `cache`. Returns (logits at each row's last real token
    [b, V], that token's position [b], cache, full logits [b, s, V])."""
    b, s = input_ids.shape
    positions = positions_from_mask(attention_mask)
    logits, cache = model.apply({"params": params}, input_ids, positions=positions, cache=cache,
                                attention_mask=attention_mask)
    last = (s - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)).astype(jnp.int32)
    rows = jnp.arange(b)
    return logits[rows, last], positions[rows, last], cache, logits


def decode_step(model, params, cache, tokens, positions):
    """Feed one token per row ([b]) at `positions` [b]. Returns (logits [b, V], cache)."""
    logits, cache = model.apply({"params": params}, tokens[:, None], positions=positions[:, None], cache=cache)
    return logits[:, 0], cache


# ---------------------------------------------------------------------------------------------------- fused decode
_DECODE_BLOCK = 64  # cache slots per block of the decode attention kernel; the stacked cache is padded to it
# projection kernels stored [out, in] for the fused decode (XLA then sees row reductions for batch-1 matmuls);
# an experiment switch for bench/sample.py, read once at import
_WEIGHTS_NK = os.environ.get("WMJAX_DECODE_WEIGHTS", "kn") == "nk"
# attention of the fused decode: "pallas" | "reference" (XLA) | unset (pallas on GPU); read once at import
_DECODE_ATTENTION = os.environ.get("WMJAX_DECODE_ATTENTION") or None


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
    ck = (lambda x: x.T) if _WEIGHTS_NK else (lambda x: x)  # kernels as [out, in] (experiment, see _WEIGHTS_NK)
    layers = []
    for i in range(config.num_hidden_layers):
        lp = m[f"layers_{i}"]
        at, mlp = lp["self_attn"], lp["mlp"]
        qkv = [at["q_proj"], at["k_proj"], at["v_proj"]]
        gu = [mlp["gate_proj"], mlp["up_proj"]]
        layer = dict(
            input_norm=lp["input_layernorm"]["weight"], post_norm=lp["post_attention_layernorm"]["weight"],
            input_residual=lp["input_residual"], post_residual=lp["post_attention_residual"],
            qkv=ck(jnp.concatenate([cast(p["kernel"]) for p in qkv], axis=1)),
            o=ck(cast(at["o_proj"]["kernel"])), dt=ck(cast(at["dt_proj"]["kernel"])), A=at["A"],
            gate_up=ck(jnp.concatenate([cast(p["kernel"]) for p in gu], axis=1)),
            down=ck(cast(mlp["down_proj"]["kernel"])))
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
        out["lm_head"] = ck(cast(params["lm_head"]["kernel"]))
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


def _rms(x, weight, eps, dtype):
    # wmjax.layers.norm.RMSNorm
    x32 = x.astype(jnp.float32)
    x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight.astype(dtype) * x32.astype(x.dtype)


def _linear(x, kernel, bias=None):
    # nn.Dense with dtype = kernel.dtype (operands already in the compute dtype); kernel [in, out], or [out, in]
    # when prepared with _WEIGHTS_NK
    y = jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (1 if _WEIGHTS_NK else 0,)), ((), ())))
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
        implementation = _DECODE_ATTENTION or ("pallas" if jax.default_backend() == "gpu" else "reference")
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
        n = _rms(x, lp["input_norm"], eps, dtype)
        qkv = _linear(n, lp["qkv"], lp.get("qkv_bias"))
        q = qkv[:, :h * d].reshape(b, 1, h, d)
        k = qkv[:, h * d:(h + g) * d].reshape(b, 1, g, d)
        v = qkv[:, (h + g) * d:]                                               # [b, G D]
        if cfg.qk_norm:
            q = _rms(q, lp["q_norm"], eps, dtype)
            k = _rms(k, lp["k_norm"], eps, dtype)
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
        m = _rms(x, lp["post_norm"], eps, dtype)
        gu = _linear(m, lp["gate_up"], lp.get("gate_up_bias"))
        f = cfg.intermediate_size
        ffn = _linear(jax.nn.silu(gu[:, :f]) * gu[:, f:], lp["down"], lp.get("down_bias"))
        x = lp["post_residual"].astype(dtype) * x + ffn
        new_k.append(k_c)
        new_v.append(v_c)
        new_b.append(kb)
    x = _rms(x, fparams["norm"], eps, dtype)
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


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "cache_kind", "cache_length", "sampling",
                                             "return_logprobs", "callback", "cache_dtype", "pad_id", "decode"))
def _generate_jit(params, input_ids, attention_mask, stop_ids, key, *, model, max_new_tokens, cache_kind,
                  cache_length, sampling, return_logprobs, callback, cache_dtype, pad_id, decode="model"):
    cfg = model.config
    b, s = input_ids.shape
    vocab = cfg.vocab_size
    cache = init_cache(cfg, b, cache_length, cache_dtype, cache_kind)
    logits, pos, cache, _ = prefill(model, params, input_ids, attention_mask, cache)
    rows = jnp.arange(b)
    use_seen = sampling.repetition_penalty != 1.0
    seen = None
    if use_seen:
        seen = jnp.zeros((b, vocab), bool).at[rows[:, None], input_ids].max(attention_mask.astype(bool))

    def emit(i, logits, seen, done, toks, lps, lengths, key):
        key, sub = jax.random.split(key)
        tok = _choose(logits, sampling, seen, sub)
        tok = jnp.where(done, pad_id, tok)
        if callback is not None:
            jax.debug.callback(callback, i, tok, ~done, ordered=True)
        toks = toks.at[:, i].set(tok)
        if return_logprobs:
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[rows, tok]
            lps = lps.at[:, i].set(jnp.where(done, 0.0, lp))
        lengths = lengths + (~done).astype(jnp.int32)
        if use_seen:
            seen = seen.at[rows, tok].set(seen[rows, tok] | ~done)
        done = done | jnp.any(tok[:, None] == stop_ids, axis=-1)
        return tok, seen, done, toks, lps, lengths, key

    toks = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    lps = jnp.zeros((b, max_new_tokens), jnp.float32) if return_logprobs else jnp.zeros((), jnp.float32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = jnp.zeros((b,), bool)
    tok, seen, done, toks, lps, lengths, key = emit(0, logits, seen, done, toks, lps, lengths, key)

    def cond(st):
        i, done = st[0], st[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    if decode == "fused":
        fparams = prepare_decode_params(cfg, params, model.dtype)
        cache = stack_decode_cache(cache)
        step = lambda cache, tok, pos: fused_decode_step(cfg, model.dtype, fparams, cache, tok, pos)
    else:
        step = lambda cache, tok, pos: decode_step(model, params, cache, tok, pos)

    def body(st):
        i, cache, tok, pos, done, seen, toks, lps, lengths, key = st
        pos = pos + 1
        logits, cache = step(cache, tok, pos)
        tok, seen, done, toks, lps, lengths, key = emit(i, logits, seen, done, toks, lps, lengths, key)
        return i + 1, cache, tok, pos, done, seen, toks, lps, lengths, key

    st = (jnp.int32(1), cache, tok, pos, done, seen, toks, lps, lengths, key)
    st = jax.lax.while_loop(cond, body, st)
    steps, toks, lps, lengths = st[0], st[6], st[7], st[8]
    return toks, lengths, (lps if return_logprobs else None), steps


def generate(model, params, prompts: Union[Sequence[Sequence[int]], Any], *, max_new_tokens: int,
             attention_mask=None, padding_side: str = "left", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop_tokens: Optional[Union[Sequence[int], Sequence[Sequence[int]]]] = None, rng=None,
             cache: str = "auto", max_cache_length: Optional[int] = None, cache_dtype=None,
             return_logprobs: bool = False, callback: Optional[Callable] = None, pad_id: Optional[int] = None,
             pad_to_multiple_of: int = 1, decode: str = "auto") -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per row; see the module docstring.

    model: a DogeForCausalLM (its dtype is the compute dtype); params: its params.
    max_cache_length: for cache="full", the cache size (default: padded prompt length + max_new_tokens); a
    prompt that does not fit with max_new_tokens is an error.
    decode: "model", "fused" (the decode-specialized step; an error where `fused_decode_supported` says it does
    not apply) or "auto" (= "model" for now; see the module docstring).
    """
    cfg = model.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be a positive integer")
    sp = SamplingParams(float(temperature), int(top_k), float(top_p), float(min_p), float(repetition_penalty))
    sp.validate()
    pad_id = (cfg.pad_token_id if cfg.pad_token_id is not None else 0) if pad_id is None else int(pad_id)

    if attention_mask is None and isinstance(prompts, (list, tuple)):
        ids, mask = pad_prompts([list(p) for p in prompts], pad_id, padding_side, pad_to_multiple_of)
    else:
        ids = np.asarray(prompts)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"generate: prompts must be token-id lists or an int array [batch, seq], got "
                             f"{ids.dtype} {ids.shape}")
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        if mask.shape != ids.shape:
            raise ValueError(f"generate: attention_mask {mask.shape} does not match prompts {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"generate: empty prompt batch {ids.shape}")
        empty = np.nonzero(mask.sum(1) == 0)[0]
        if empty.size:
            raise ValueError(f"generate: empty prompt in row(s) {empty.tolist()} (attention_mask all zero)")
        ids = ids.astype(np.int32)
    real = ids[mask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= cfg.vocab_size):
        raise ValueError(f"generate: token ids must be in [0, vocab_size={cfg.vocab_size}); got "
                         f"[{real.min()}, {real.max()}]")
    b, s = ids.shape

    total = s + max_new_tokens
    kind = _cache_kind(cache, cfg, total)
    if kind == "full":
        length = total if max_cache_length is None else int(max_cache_length)
        if s > length:
            raise ValueError(f"generate: prompt of {s} tokens (padded) is longer than the cache "
                             f"(max_cache_length={length})")
        if total > length:
            raise ValueError(f"generate: prompt of {s} tokens (padded) + max_new_tokens={max_new_tokens} = {total} "
                             f"does not fit the cache (max_cache_length={length}); lower max_new_tokens, raise "
                             "max_cache_length or use cache='bounded'")
    else:
        length = cfg.keep_window_size  # unused by the bounded cache

    # stop tokens -> [b, n] int32 padded with -1
    if stop_tokens is None:
        rows = [[cfg.eos_token_id] if cfg.eos_token_id is not None else [] for _ in range(b)]
    elif len(stop_tokens) and isinstance(stop_tokens[0], (list, tuple, np.ndarray)):
        if len(stop_tokens) != b:
            raise ValueError(f"generate: {len(stop_tokens)} per-row stop-token lists for {b} rows")
        rows = [list(r) for r in stop_tokens]
    else:
        rows = [list(stop_tokens)] * b
    n = max(1, max(len(r) for r in rows))
    stop = np.full((b, n), -1, np.int32)
    for i, r in enumerate(rows):
        stop[i, :len(r)] = r

    if rng is None:
        if not sp.greedy:
            raise ValueError("generate: sampling (temperature > 0) needs a PRNG key: rng=jax.random.key(seed)")
        rng = jax.random.PRNGKey(0)
    cache_dtype = jnp.dtype(model.dtype if cache_dtype is None else cache_dtype)
    if decode not in ("auto", "model", "fused"):
        raise ValueError(f"generate: decode={decode!r}; expected 'auto', 'model' or 'fused'")
    from wmjax.models.doge import DogeForCausalLM
    fused_ok = isinstance(model, DogeForCausalLM) and fused_decode_supported(cfg, kind, int(length))
    if decode == "fused" and not fused_ok:
        raise ValueError("generate: decode='fused' needs a dense Doge with a full cache no longer than "
                         "keep_window_size, no sliding window and bias heads = kv heads (fused_decode_supported)")
    decode = "fused" if decode == "fused" else "model"  # auto: the model path (measured faster on H100 so far)
    toks, lengths, lps, steps = _generate_jit(
        params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(stop), rng, model=model,
        max_new_tokens=int(max_new_tokens), cache_kind=kind, cache_length=int(length), sampling=sp,
        return_logprobs=bool(return_logprobs), callback=callback, cache_dtype=cache_dtype, pad_id=pad_id,
        decode=decode)
    return GenerateOutput(toks, lengths, lps, steps)
