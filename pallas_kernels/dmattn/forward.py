"""Forward flash kernel (Pallas, Triton backend) and the key iteration shared with the dq kernel.

One program per (query block t, batch, query head). Row i keeps key j iff j <= i < e_j (e from the pre-pass;
padding keys have e_j = j). Keys are visited in three parts, online softmax in f32:
  * sparse mode, list fits: the earlier keys j < i0 kept at row i0 (the block's first row), gathered by index
    from the pre-pass list (at most w of them without ties): work O(w + block_q) per row, not O(i);
  * dense mode (L <= w: no pre-pass at all; or a list that overflowed on ties): every earlier key, contiguous;
  * the block's own keys [i0, i0 + block_q) with the causal test.
Rows with no kept key output zeros (lse = +inf); the reference gives those padding rows the uniform average.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .config import DmattnConfig, compiler_params, dot_precision

NEG_INF = float("-inf")


def _dot_nt(a, b, prec):
    """a [m, d] . b [n, d]^T -> [m, n] f32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def _dot_nn(a, b, prec):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def visit_keys(tile, carry, *, i0, block_q, block_k, rows, k_ref, v_ref, bias_ref, e_ref, lst_ref, cnt_ref, cap):
    """Calls carry = tile(carry, k [bk, d], v [bk, d], bias [bk] f32, keep [bq, bk] bool) for every key chunk
    that row block [i0, i0 + block_q) may keep. lst_ref/cnt_ref None = dense mode."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def dense_prefix(c, carry):
        j0 = pl.multiple_of(c * block_k, block_k)
        sl = pl.ds(j0, block_k)
        e = e_ref[sl]
        keep = rows[:, None] < e[None, :]  # j < i0 <= i
        return tile(carry, k_ref[sl, :], v_ref[sl, :], bias_ref[sl], keep)

    n_dense = i0 // block_k
    if lst_ref is not None:
        n = cnt_ref[0]
        use_list = n <= cap

        def listed(c, carry):
            pos = c * block_k + lane
            valid = pos < n
            idx = jnp.where(valid, lst_ref[pl.ds(pl.multiple_of(c * block_k, block_k), block_k)], 0)
            e = e_ref[idx]
            keep = valid[None, :] & (rows[:, None] < e[None, :])
            return tile(carry, k_ref[idx, :], v_ref[idx, :], bias_ref[idx], keep)

        carry = jax.lax.fori_loop(0, jnp.where(use_list, (n + block_k - 1) // block_k, 0), listed, carry)
        n_dense = jnp.where(use_list, 0, n_dense)
    carry = jax.lax.fori_loop(0, n_dense, dense_prefix, carry)

    def diagonal(c, carry):
        j0 = pl.multiple_of(i0 + c * block_k, block_k)
        sl = pl.ds(j0, block_k)
        e = e_ref[sl]
        j = j0 + lane
        keep = (j[None, :] <= rows[:, None]) & (rows[:, None] < e[None, :])
        return tile(carry, k_ref[sl, :], v_ref[sl, :], bias_ref[sl], keep)

    return jax.lax.fori_loop(0, block_q // block_k, diagonal, carry)


def _fwd_kernel(*refs, scale, block_q, block_k, cap, sparse, prec):
    if sparse:
        q_ref, k_ref, v_ref, bias_ref, e_ref, lst_ref, cnt_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, bias_ref, e_ref, o_ref, lse_ref = refs
        lst_ref = cnt_ref = None
    t = pl.program_id(0)
    i0 = t * block_q
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q = q_ref[...]
    d = q.shape[-1]

    def tile(carry, k, v, bias, keep):
        m, l, acc = carry
        s = _dot_nt(q, k, prec) * scale + bias[None, :]
        s = jnp.where(keep, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v, prec)
        return m_new, l, acc

    carry = (jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, d), jnp.float32))
    m, l, acc = visit_keys(tile, carry, i0=i0, block_q=block_q, block_k=block_k, rows=rows, k_ref=k_ref,
                           v_ref=v_ref, bias_ref=bias_ref, e_ref=e_ref, lst_ref=lst_ref, cnt_ref=cnt_ref, cap=cap)
    nonempty = l > 0.0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(l_safe), jnp.inf)


def flash_forward(q, k, v, bias, e, lists, counts, *, scale, cap, cfg: DmattnConfig):
    """q [b, L, H, D], k/v [b, L, G, D], bias [b, G, L] f32, e [b, G, L] int32, lists [b, G, nq, W] / counts
    [b, G, nq] int32 or None (dense mode). L a multiple of the blocks. Returns (o [b, L, H, D], lse [b, H, L])."""
    b, length, h, d = q.shape
    g = k.shape[2]
    r = h // g
    bq, bk = cfg.block_q, cfg.block_k
    sparse = lists is not None
    kernel = functools.partial(_fwd_kernel, scale=scale, block_q=bq, block_k=bk, cap=cap, sparse=sparse,
                               prec=dot_precision(q.dtype))
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda t, bi, hi: (bi, t, hi, 0)),
        pl.BlockSpec((None, length, None, d), lambda t, bi, hi: (bi, 0, hi // r, 0)),
        pl.BlockSpec((None, length, None, d), lambda t, bi, hi: (bi, 0, hi // r, 0)),
        pl.BlockSpec((None, None, length), lambda t, bi, hi: (bi, hi // r, 0)),
        pl.BlockSpec((None, None, length), lambda t, bi, hi: (bi, hi // r, 0)),
    ]
    args = [q, k, v, bias, e]
    if sparse:
        width = lists.shape[-1]
        in_specs += [pl.BlockSpec((None, None, None, width), lambda t, bi, hi: (bi, hi // r, t, 0)),
                     pl.BlockSpec((None, None, 1), lambda t, bi, hi: (bi, hi // r, t))]
        args += [lists, counts]
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)),
        grid=(length // bq, b, h),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda t, bi, hi: (bi, t, hi, 0)),
                   pl.BlockSpec((None, None, bq), lambda t, bi, hi: (bi, hi, t))],
        compiler_params=compiler_params(cfg.num_warps_fwd, cfg.num_stages_fwd),
        interpret=cfg.interpret,
        name="dmattn_fwd",
    )(*args)
