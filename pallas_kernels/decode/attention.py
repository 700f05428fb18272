"""Pallas (Triton backend) single-token decode attention over a layer-stacked full KV cache.

One query token per row attends to the cached keys of one layer plus its own (new) key, with the DMA rule of
`wmjax.cache.kv_decode_attention` for a cache no longer than keep_window_size (every visible key is kept):

    s_c   = (q . k_c) * scale + (bias_c if valid_c else finfo(f32).min)     c = cached slots of layer `layer`
    s_new = (q . k_new) * scale + bias_new                                  (the token being fed; always visible)
    out   = softmax([s, s_new]) @ [V; v_new]

computed flash-decoding style in one program per (row, kv head): a loop over blocks of `block_c` cached slots
with an online softmax, started from the new token. The new key/value/bias are separate inputs, so the caller
can write every layer's new entries into the stacked cache once per step (one dynamic_update_slice) instead of
five writes per layer before the attention.

Layouts: q [b, G, R, D] (R = query heads per kv head, padded to a power of two >= 16 with zero rows);
k_new, v_new [b, G, D] (cache dtype); bias_new [b, G, R] f32 (the new key's bias, per query row);
kv [L, b, C, 2, G, D] (keys at [..., 0, :, :], values at [..., 1, :, :]); bias [L, b, G, C] f32;
valid [b, C] int32 (1 = slot holds a real token visible to the query). C a multiple of block_c. The layer is a
Python int (baked into the block index maps: one compiled kernel per layer) or an int32 scalar operand (one
kernel for every layer, indexing the layer inside).
Scores: dot of q and keys in q's dtype with f32 accumulation (exact products of bf16 inputs); softmax in f32;
probabilities (f32) times values: for f32 inputs an IEEE f32 dot (not TF32); for bf16/f16 inputs the f32
probabilities split into hi + lo half-precision parts, two tensor-core dots with f32 accumulation (relative
error of p below 2^-16; the values are exact in their dtype). Every `pallas_call` names the
Triton backend (CompilerParams), so jax 0.10 and 0.11 lower the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

__all__ = ["decode_attention_pallas", "decode_attention_reference"]

_F32 = jnp.float32
_DEBUG = False
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _kernel(*refs, scale, block_c, n_blocks, dynamic_layer):
    if dynamic_layer:  # the refs hold every layer; the layer index is an operand
        lyr_ref, q_ref, kn_ref, vn_ref, bn_ref, k_ref, v_ref, b_ref, valid_ref, o_ref = refs
        at = (lyr_ref[0],)
    else:
        q_ref, kn_ref, vn_ref, bn_ref, k_ref, v_ref, b_ref, valid_ref, o_ref = refs
        at = ()
    q = q_ref[...]                                   # [R, D]
    qprec = lax.Precision.HIGHEST if q.dtype == _F32 else None
    kn = kn_ref[...].astype(q.dtype).astype(_F32)    # [D]
    vn = vn_ref[...].astype(q.dtype).astype(_F32)    # [D]
    s_new = jnp.sum(q.astype(_F32) * kn[None, :], axis=1) * scale + bn_ref[...]  # [R]
    m = s_new
    l = jnp.ones_like(s_new)
    acc = jnp.zeros((q.shape[0], q.shape[1]), _F32) + vn[None, :]
    neg = jnp.finfo(_F32).min

    def body(j, carry):
        m, l, acc = carry
        c0 = pl.multiple_of(j * block_c, block_c)
        cols = pl.ds(c0, block_c)
        kc = k_ref[at + (cols, slice(None))].astype(q.dtype)                                      # [BC, D]
        s = lax.dot_general(q, kc, _NT, precision=qprec, preferred_element_type=_F32) * scale   # [R, BC]
        add = jnp.where(valid_ref[cols] != 0, b_ref[at + (cols,)], neg)                # [BC]
        s = s + add[None, :]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        vc = v_ref[at + (cols, slice(None))].astype(q.dtype)                                      # [BC, D]
        if q.dtype == _F32:
            pv = lax.dot_general(p, vc, _NN, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)
        else:
            # f32 probabilities as hi + lo half-precision parts on the tensor cores (an IEEE f32 dot runs on FMA
            # units): p - hi - lo is below 2^-16 |p|, far under the output's own rounding
            p_hi = p.astype(q.dtype)
            p_lo = (p - p_hi.astype(_F32)).astype(q.dtype)
            pv = (lax.dot_general(p_hi, vc, _NN, preferred_element_type=_F32)
                  + lax.dot_general(p_lo, vc, _NN, preferred_element_type=_F32))
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    m, l, acc = lax.fori_loop(0, n_blocks, body, (m, l, acc))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def decode_attention_pallas(q, k_new, v_new, bias_new, kv, bias, valid, *, layer, scale: float,
                            block_c: int = 64, num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Returns [b, G, R, D] in q.dtype. See the module docstring for layouts.

    layer: a Python int (baked into the block index maps: one compiled kernel per layer) or an int32 scalar
    array (an operand read in the kernel: one kernel for every layer)."""
    b, g, r, d = q.shape
    nl, _, c, two, g2, _ = kv.shape
    dynamic = not isinstance(layer, int)
    if two != 2 or g2 != g or (not dynamic and not 0 <= layer < nl):
        raise ValueError(f"decode_attention_pallas: kv {kv.shape} does not fit q {q.shape} / layer {layer}")
    if c % block_c:
        raise ValueError(f"decode_attention_pallas: cache length {c} must be a multiple of block_c={block_c}")
    if r < 16 or r & (r - 1) or d & (d - 1):
        raise ValueError(f"decode_attention_pallas: query rows per kv head {r} (a power of two >= 16) and "
                         f"head_dim {d} (a power of two) needed; the caller pads")
    kern = functools.partial(_kernel, scale=float(scale), block_c=block_c, n_blocks=c // block_c,
                             dynamic_layer=dynamic)
    if dynamic:
        lspecs = [pl.BlockSpec((nl, None, c, None, None, d), lambda ib, ig: (0, ib, 0, 0, ig, 0)),   # keys
                  pl.BlockSpec((nl, None, c, None, None, d), lambda ib, ig: (0, ib, 0, 1, ig, 0)),   # values
                  pl.BlockSpec((nl, None, None, c), lambda ib, ig: (0, ib, ig, 0))]                  # bias
        lead_specs = [pl.BlockSpec((1,), lambda ib, ig: (0,))]
        lead = (jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),)
    else:
        lspecs = [pl.BlockSpec((None, None, c, None, None, d), lambda ib, ig: (layer, ib, 0, 0, ig, 0)),
                  pl.BlockSpec((None, None, c, None, None, d), lambda ib, ig: (layer, ib, 0, 1, ig, 0)),
                  pl.BlockSpec((None, None, None, c), lambda ib, ig: (layer, ib, ig, 0))]
        lead_specs, lead = [], ()
    return pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((b, g, r, d), q.dtype),
        grid=(b, g),
        in_specs=lead_specs + [
            pl.BlockSpec((None, None, r, d), lambda ib, ig: (ib, ig, 0, 0)),                 # q
            pl.BlockSpec((None, None, d), lambda ib, ig: (ib, ig, 0)),                      # k_new
            pl.BlockSpec((None, None, d), lambda ib, ig: (ib, ig, 0)),                      # v_new
            pl.BlockSpec((None, None, r), lambda ib, ig: (ib, ig, 0)),                      # bias_new
        ] + lspecs + [
            pl.BlockSpec((None, c), lambda ib, ig: (ib, 0)),                                # valid
        ],
        out_specs=pl.BlockSpec((None, None, r, d), lambda ib, ig: (ib, ig, 0, 0)),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="wmjax_decode_attention", debug=_DEBUG,
    )(*lead, q, k_new, v_new, bias_new, kv, kv, bias, valid)


def decode_attention_reference(q, k_new, v_new, bias_new, kv, bias, valid, *, layer: int, scale: float):
    """Plain-jnp version of `decode_attention_pallas` (same inputs; any R, C): one softmax over the cached slots
    of `layer` and the new key."""
    keys = kv[layer, :, :, 0].astype(q.dtype)                   # [b, C, G, D]
    values = kv[layer, :, :, 1].astype(q.dtype).astype(_F32)
    hp = lax.Precision.HIGHEST
    s = jnp.einsum("bgrd,bcgd->bgrc", q, keys, precision=hp, preferred_element_type=_F32) * scale
    add = jnp.where(valid[:, None].astype(bool), bias[layer], jnp.finfo(_F32).min)   # [b, G, C]
    s = s + add[:, :, None]
    kn = k_new.astype(q.dtype).astype(_F32)
    s_new = jnp.einsum("bgrd,bgd->bgr", q.astype(_F32), kn, precision=hp) * scale + bias_new
    probs = jax.nn.softmax(jnp.concatenate([s, s_new[..., None]], axis=-1), axis=-1)
    out = jnp.einsum("bgrc,bcgd->bgrd", probs[..., :-1], values, precision=hp)
    out = out + probs[..., -1:] * v_new.astype(q.dtype).astype(_F32)[:, :, None]
    return out.astype(q.dtype)
