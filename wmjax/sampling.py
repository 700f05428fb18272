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

Decode path (`decode=`): the backend of the one decode step (`decode_step(..., backend=)`), on the cache the
prefill filled: "model" runs every decode step through the Flax model; "fused" through
`wmjax.fused_decode.fused_decode_step`, a decode-specialized step for dense Doge with a full cache that fits
keep_window_size (five `pallas_kernels.decode` kernels per layer: projections with the norm / residual / SwiGLU
fused in, and the layer's attention with q/k norm, RoPE, key bias and the cache write fused in; off the GPU the
kernels run in Pallas interpret mode, slow, for tests). "auto" (default) is "fused" on GPU where
`fused_decode_supported` says it applies (measured faster at batch 1 and 16: docs/BENCHMARKS.md, Sampling), else
"model". The fused kernels' blocks / warps / stages are `pallas_kernels.decode.tuning`'s tuned defaults.

Streaming: `callback(step, tokens [b] np.int32, active [b] np.bool)` is called on the host once per generated
token position (through `jax.debug.callback`; `active` is False for rows already stopped before this step).
It is an ordered effect (calls arrive in step order) and syncs the device each step, so leave it out when
measuring throughput.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode.tuning import current as current_decode_tuning
from wmjax.fused_decode import FusedParams, fused_decode_step, fused_decode_supported, prepare_decode_params
from wmjax.models.doge import DogeForCausalLM
from wmjax.models.registry import family_of

__all__ = ["SamplingParams", "GenerateOutput", "generate", "process_logits", "prefill", "decode_step",
           "pad_prompts", "positions_from_mask", "DECODE_PATHS", "DECODE_BACKENDS"]

# generate(decode=...): "model" = the Flax model's decode step; "fused" = wmjax.fused_decode on the
# pallas_kernels.decode kernels (Pallas interpret mode off the GPU).
DECODE_PATHS = ("auto", "model", "fused")


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
    if not hasattr(config, "keep_window_size"):  # no dynamic-mask attention: only the full cache applies
        if kind not in ("auto", "full"):
            raise ValueError(f"cache={kind!r}: the bounded cache is for dynamic-mask attention, which "
                             f"{type(config).__name__} has not; use 'auto' or 'full'")
        return "full"
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


DECODE_BACKENDS = ("model", "fused")


def decode_step(model, params, cache, tokens, positions, *, backend: str = "model", tuning=None):
    """Feed one token per row ([b]) at `positions` [b]. Returns (logits [b, V], cache).

    backend "model": the Flax model, `params` its params, any cache kind. "fused": the decode kernels
    (`wmjax.fused_decode.fused_decode_step`), `params` the model's params prepared once by `prepare_decode_params`
    (a `FusedParams`), a full cache whose capacity is a multiple of `tuning.cache_block` (tuning: the kernels'
    `DecodeTuning`, None = the tuned defaults)."""
    if backend == "fused":
        if not isinstance(params, FusedParams):
            raise TypeError(f"decode_step: backend='fused' takes prepare_decode_params' FusedParams, got "
                            f"{type(params).__name__}")
        return fused_decode_step(model.config, model.dtype, params, cache, tokens, positions, tuning=tuning)
    if backend != "model":
        raise ValueError(f"decode_step: backend={backend!r}; expected one of {DECODE_BACKENDS}")
    logits, cache = model.apply({"params": params}, tokens[:, None], positions=positions[:, None], cache=cache)
    return logits[:, 0], cache


_STATIC = ("model", "max_new_tokens", "cache_kind", "cache_length", "sampling", "return_logprobs", "callback",
           "cache_dtype", "pad_id", "decode", "decode_tuning")


def _generate_impl(params, input_ids, attention_mask, stop_ids, key, *, model, max_new_tokens, cache_kind,
                  cache_length, sampling, return_logprobs, callback, cache_dtype, pad_id, decode="model",
                  decode_tuning=None):
    cfg = model.config
    b, s = input_ids.shape
    vocab = cfg.vocab_size
    fused = decode == "fused"
    # the fused kernels read the cache in blocks: its capacity is rounded up (the extra slots are never valid)
    block = (decode_tuning or current_decode_tuning()).cache_block if fused else 1
    cache = family_of(cfg).init_cache(cfg, b, cache_length, cache_dtype, cache_kind, multiple_of=block)
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

    # the decode step's params: the model's, or (fused) its kernels' operands, prepared once before the loop
    step_params = prepare_decode_params(cfg, params, model.dtype, decode_tuning) if fused else params

    def body(st):
        i, cache, tok, pos, done, seen, toks, lps, lengths, key = st
        pos = pos + 1
        logits, cache = decode_step(model, step_params, cache, tok, pos, backend=decode, tuning=decode_tuning)
        tok, seen, done, toks, lps, lengths, key = emit(i, logits, seen, done, toks, lps, lengths, key)
        return i + 1, cache, tok, pos, done, seen, toks, lps, lengths, key

    st = (jnp.int32(1), cache, tok, pos, done, seen, toks, lps, lengths, key)
    st = jax.lax.while_loop(cond, body, st)
    steps, toks, lps, lengths = st[0], st[6], st[7], st[8]
    return toks, lengths, (lps if return_logprobs else None), steps


_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC)


def generate(model, params, prompts: Union[Sequence[Sequence[int]], Any], *, max_new_tokens: int,
             attention_mask=None, padding_side: str = "left", temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             stop_tokens: Optional[Union[Sequence[int], Sequence[Sequence[int]]]] = None, rng=None,
             cache: str = "auto", max_cache_length: Optional[int] = None, cache_dtype=None,
             return_logprobs: bool = False, callback: Optional[Callable] = None, pad_id: Optional[int] = None,
             pad_to_multiple_of: int = 1, decode: str = "auto") -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per row; see the module docstring.

    model: the Flax model of any family (wmjax.models.registry; its dtype is the compute dtype); params: its params.
    max_cache_length: for cache="full", the cache size (default: padded prompt length + max_new_tokens); a
    prompt that does not fit with max_new_tokens is an error. A prompt that, with max_new_tokens, runs past
    config.max_position_embeddings gets a UserWarning naming the lengths.
    decode: "model", "fused" (wmjax.fused_decode; an error where `fused_decode_supported` says it does not apply)
    or "auto" ("fused" on GPU where it applies, else "model"; see the module docstring).
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
    longest, limit = int(mask.sum(1).max()), cfg.max_position_embeddings
    if longest + max_new_tokens > limit:
        what = (f"a prompt of {longest} tokens" if longest > limit else
                f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {longest + max_new_tokens}")
        warnings.warn(f"generate: {what} is longer than max_position_embeddings={limit}; the model was not made "
                      "for positions past it", stacklevel=2)

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
    if decode not in DECODE_PATHS:
        raise ValueError(f"generate: decode={decode!r}; expected one of {DECODE_PATHS}")
    fused_ok = isinstance(model, DogeForCausalLM) and fused_decode_supported(cfg, kind, int(length))
    if decode == "fused" and not fused_ok:
        raise ValueError(f"generate: decode={decode!r} needs a dense Doge with a full cache no longer than "
                         "keep_window_size, no sliding window and bias heads = kv heads (fused_decode_supported)")
    if decode == "auto":  # the fused kernels on GPU (measured faster at bs 1 and 16 on an H100), else the model
        # (the GPU attention kernel's tensor-core dots need head_dim >= 32)
        decode = "fused" if fused_ok and jax.default_backend() == "gpu" and cfg.head_dim >= 32 else "model"
    toks, lengths, lps, steps = _generate_jit(
        params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(stop), rng, model=model,
        max_new_tokens=int(max_new_tokens), cache_kind=kind, cache_length=int(length), sampling=sp,
        return_logprobs=bool(return_logprobs), callback=callback, cache_dtype=cache_dtype, pad_id=pad_id,
        decode=decode, decode_tuning=current_decode_tuning() if decode == "fused" else None)
    return GenerateOutput(toks, lengths, lps, steps)
