"""Fused LM-head + cross-entropy: the next-token loss without materialising the [b, s, vocab] f32 logits.

    obj, ce_sum, z_sum = lm_head_cross_entropy(hidden, weight, targets, mask, z_coef=0.0, chunk_tokens=8192)

    logits = dot(hidden, W^T)          (compute dtype, e.g. bf16 -- the same rounding as the model's logits)
    lse    = logsumexp(f32(logits))
    ce_sum = sum(mask * (lse - logits[target])),  z_sum = sum(mask * lse^2),  obj = ce_sum + z_coef * z_sum

It equals ``DogeForCausalLM``'s logits followed by the f32 log-softmax loss of ``train.trainer`` (the model
computes the same compute-dtype logits and the trainer casts them to f32), but works on chunks of the sequence
with ``lax.scan`` and computes the gradient inside the forward pass (the loss is the end of the graph, so
d obj / d logits = mask * (softmax * (1 + 2 z_coef lse) - onehot(target)) is known there): per chunk one
logits matmul, one fused softmax pass writing the compute-dtype d logits, and the two gradient matmuls. The
backward rule only scales the stored d hidden [b, s, d] (f32) and d W [V, d] (f32) by the incoming cotangent.
Nothing of size [b, s, vocab] outlives a chunk and no f32 copy of it is ever written.

``ce_sum`` and ``z_sum`` come back through ``stop_gradient`` (they are metrics; differentiate ``obj``).
``weight`` is [vocab, d] (``layout="vd"``, a tied embedding) or [d, vocab] (``layout="dv"``, an lm_head kernel),
in any float dtype (f32 master params); it is cast to ``hidden.dtype`` for the matmuls as the model does, and
its gradient is accumulated in f32 and returned in the weight's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["lm_head_cross_entropy", "pick_chunk"]


def pick_chunk(seq_len: int, batch: int, chunk_tokens: int) -> int:
    """Largest divisor of seq_len with batch * chunk <= chunk_tokens (at least 1)."""
    want = max(1, chunk_tokens // max(batch, 1))
    if want >= seq_len:
        return seq_len
    for c in range(want, 0, -1):
        if seq_len % c == 0:
            return c
    return 1


def _chunks(x, c):
    """[b, s, ...] -> [s // c, b, c, ...]."""
    b, s = x.shape[:2]
    return x.reshape(b, s // c, c, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x):
    """[n, b, c, ...] -> [b, n * c, ...]."""
    n, b, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])


def _logits(h, w, layout):
    # same op as the model: compute-dtype matmul, compute-dtype result (f32 accumulation inside the dot)
    if layout == "vd":
        return jnp.einsum("bcd,vd->bcv", h, w)
    return jnp.einsum("bcd,dv->bcv", h, w)


def _stats(logits, tgt):
    lf = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(lf, axis=-1)
    picked = jnp.take_along_axis(lf, tgt[..., None], axis=-1)[..., 0]
    return lf, lse, picked


def _forward_only(hidden, weight, targets, mask, z_coef, c, layout):
    w = weight.astype(hidden.dtype)

    def body(acc, xs):
        h, t, m = xs
        _, lse, picked = _stats(_logits(h, w, layout), t)
        ce, z = acc
        return (ce + jnp.sum((lse - picked) * m), z + jnp.sum(jnp.square(lse) * m)), None

    z0 = jnp.zeros((), jnp.float32)
    (ce, z), _ = jax.lax.scan(body, (z0, z0), (_chunks(hidden, c), _chunks(targets, c), _chunks(mask, c)))
    return ce + z_coef * z, ce, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, weight, targets, mask, z_coef, c, layout):
    return _forward_only(hidden, weight, targets, mask, z_coef, c, layout)


def _fused_fwd(hidden, weight, targets, mask, z_coef, c, layout):
    cdt = hidden.dtype
    w = weight.astype(cdt)

    def body(dw, xs):
        h, t, m = xs
        lf, lse, picked = _stats(_logits(h, w, layout), t)
        tok = (lse - picked) + z_coef * jnp.square(lse)  # per-token objective (d obj / d mask)
        p = jnp.exp(lf - lse[..., None])
        if z_coef:
            p = p * (1.0 + 2.0 * z_coef * lse)[..., None]
        onehot = jax.lax.broadcasted_iota(jnp.int32, lf.shape, 2) == t[..., None]
        g = ((p - onehot.astype(jnp.float32)) * m[..., None]).astype(cdt)  # d obj / d logits
        if layout == "vd":
            dh = jnp.einsum("bcv,vd->bcd", g, w, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcv,bcd->vd", g, h, preferred_element_type=jnp.float32)
        else:
            dh = jnp.einsum("bcv,dv->bcd", g, w, preferred_element_type=jnp.float32)
            dw = dw + jnp.einsum("bcd,bcv->dv", h, g, preferred_element_type=jnp.float32)
        return dw, (jnp.sum((lse - picked) * m), jnp.sum(jnp.square(lse) * m), tok, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32)
    dw, (ces, zs, tok, dh) = jax.lax.scan(
        body, dw0, (_chunks(hidden, c), _chunks(targets, c), _chunks(mask, c)))
    ce, z = jnp.sum(ces), jnp.sum(zs)
    res = (_unchunk(dh), dw, _unchunk(tok), jnp.zeros((), hidden.dtype), jnp.zeros((), weight.dtype))
    return (ce + z_coef * z, ce, z), res


def _fused_bwd(z_coef, c, layout, res, cts):
    dh, dw, tok, hdt, wdt = res
    hdt, wdt = hdt.dtype, wdt.dtype
    g = cts[0]  # cotangents of ce_sum / z_sum are zero (stop_gradient in the public wrapper)
    return ((dh * g).astype(hdt), (dw * g).astype(wdt), None, (tok * g).astype(jnp.float32))


_fused.defvjp(_fused_fwd, _fused_bwd)


def lm_head_cross_entropy(hidden, weight, targets, mask, *, z_coef: float = 0.0, chunk_tokens: int = 8192,
                          layout: str = "vd"):
    """hidden [b, s, d] (compute dtype), weight [V, d] ("vd") or [d, V] ("dv"), targets [b, s] int, mask [b, s].

    Returns (obj, ce_sum, z_sum) f32 scalars; obj = ce_sum + z_coef * z_sum is differentiable w.r.t. hidden,
    weight and mask; ce_sum and z_sum are metrics (no gradient).
    """
    if layout not in ("vd", "dv"):
        raise ValueError(f"layout must be 'vd' or 'dv', got {layout!r}")
    b, s = targets.shape
    c = pick_chunk(s, b, int(chunk_tokens))
    mask = jnp.asarray(mask, jnp.float32)
    obj, ce, z = _fused(hidden, weight, targets.astype(jnp.int32), mask, float(z_coef), c, layout)
    return obj, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z)
