"""Forward flash kernel (Pallas, Triton backend) and the key iteration shared with the dq kernel.

Grid (b, H, L / block_q): one program per (batch, query head, query block t), query blocks slowest and the
longest (last) blocks launched first. Row i keeps key j iff j <= i < e_j (e from the pre-pass; padding keys have e_j = j). Keys
are visited in three parts, online softmax in f32 and base 2 (exp2, log2(e) folded into the scale):
  * sparse mode, list fits: the earlier keys j < i0 kept at row i0 (the block's first row), gathered by index
    from the pre-pass list (at most w of them without ties): work O(w + block_q) per row, not O(i);
  * dense mode (L <= w: no pre-pass at all; or a list that overflowed on ties): every earlier key, contiguous;
    with L <= w, `dense_block_meta` lets it skip the leading key blocks that expired before the block and run the
    rest without a mask when every row keeps every key (plain causal: all of them);
  * the block's own keys [i0, i0 + block_q) with the causal test.
Rows with no kept key output zeros (lse = +inf); the reference gives those padding rows the uniform average.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dmattn.config import BIG, DmattnConfig, compiler_params, dot_precision
from pallas_kernels.lowering import lower_once

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
LN2 = 0.6931471805599453


def _dot_nt(a, b, prec):
    """a [m, d] . b [n, d]^T -> [m, n] f32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def _dot_nn(a, b, prec):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)


def dense_block_meta(e, block_q: int, block_k: int):
    """Dense mode (no key lists): e [b, G, L] (the same for every kv head there) -> [b, nq, 2] int32 per query
    block t (rows [i0, i0 + block_q), i0 = t * block_q): lo = the number of leading key blocks whose keys have all
    expired by row i0 (kept by no row of the block: skipped), clean = 1 when every key of the blocks [lo, i0 / block_k)
    is kept by every row of the block (e_j >= i0 + block_q: those tiles need no mask). Packed documents and padding
    make some blocks unclean; plain causal attention has lo = 0 and every block clean. O(L^2 / block^2) int work."""
    e0 = e[:, 0, :]
    b, length = e0.shape
    nk, nq = length // block_k, length // block_q
    eb = e0.reshape(b, nk, block_k)
    emin, emax = jnp.min(eb, axis=-1), jnp.max(eb, axis=-1)
    pref = jax.lax.cummax(emax, axis=1)
    i0 = jnp.arange(nq, dtype=jnp.int32) * block_q
    nd = i0 // block_k
    lo = jnp.minimum(jnp.sum((pref[:, None, :] <= i0[None, :, None]).astype(jnp.int32), axis=-1), nd[None, :])
    c = jnp.arange(nk, dtype=jnp.int32)
    inr = (c[None, None, :] >= lo[:, :, None]) & (c[None, None, :] < nd[None, :, None])
    mn = jnp.min(jnp.where(inr, emin[:, None, :], BIG), axis=-1)
    clean = (mn >= (i0 + block_q)[None, :]).astype(jnp.int32)
    return jnp.stack([lo, clean], axis=-1).astype(jnp.int32)


def visit_keys(tile, carry, *, i0, block_q, block_k, rows, k_ref, v_ref, bias_ref, e_ref, lst_ref, cnt_ref, cap,
               meta_ref=None):
    """Calls carry = tile(carry, k [bk, d], v [bk, d], bias [bk] f32, keep [bq, bk] bool or None = all kept) for
    every key chunk that row block [i0, i0 + block_q) may keep. lst_ref/cnt_ref None = dense mode; then meta_ref
    (`dense_block_meta`) gives the first key block and whether the earlier blocks need no mask."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def dense_prefix(c, carry):
        j0 = pl.multiple_of(c * block_k, block_k)
        sl = pl.ds(j0, block_k)
        e = e_ref[sl]
        keep = rows[:, None] < e[None, :]  # j < i0 <= i
        return tile(carry, k_ref[sl, :], v_ref[sl, :], bias_ref[sl], keep)

    def clean_prefix(c, carry):  # every key of the chunk kept by every row of the block
        sl = pl.ds(pl.multiple_of(c * block_k, block_k), block_k)
        return tile(carry, k_ref[sl, :], v_ref[sl, :], bias_ref[sl], None)

    n_dense = i0 // block_k
    lo = 0
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
    elif meta_ref is not None:
        lo = meta_ref[0]
        mid = jnp.where(meta_ref[1] > 0, n_dense, lo)
        carry = jax.lax.fori_loop(lo, mid, clean_prefix, carry)
        lo = mid
    carry = jax.lax.fori_loop(lo, n_dense, dense_prefix, carry)

    def diagonal(c, carry):
        j0 = pl.multiple_of(i0 + c * block_k, block_k)
        sl = pl.ds(j0, block_k)
        e = e_ref[sl]
        j = j0 + lane
        keep = (j[None, :] <= rows[:, None]) & (rows[:, None] < e[None, :])
        return tile(carry, k_ref[sl, :], v_ref[sl, :], bias_ref[sl], keep)

    return jax.lax.fori_loop(0, block_q // block_k, diagonal, carry)


def query_block_index(nq: int):
    """Grid (b, heads, nq) with the query block slowest, so programs start in block order: the last (longest
    causal) query blocks start first (longest-processing-time-first over the SMs)."""
    return lambda t: nq - 1 - t


def _fwd_kernel(*refs, scale, block_q, block_k, cap, sparse, prec, nq):
    meta_ref = lst_ref = cnt_ref = None
    if sparse:
        q_ref, k_ref, v_ref, bias_ref, e_ref, lst_ref, cnt_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, bias_ref, e_ref, meta_ref, o_ref, lse_ref = refs
    t = query_block_index(nq)(pl.program_id(2))
    i0 = t * block_q
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q = q_ref[...]
    d = q.shape[-1]
    qk_scale = scale * LOG2E

    def tile(carry, k, v, bias, keep):  # scores in base-2 units: s2 = (scale q.k + bias) * log2(e)
        m, l, acc = carry
        s = _dot_nt(q, k, prec) * qk_scale + (bias * LOG2E)[None, :]
        if keep is not None:
            s = jnp.where(keep, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v, prec)
        return m_new, l, acc

    carry = (jnp.full((block_q,), NEG_INF, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             jnp.zeros((block_q, d), jnp.float32))
    m, l, acc = visit_keys(tile, carry, i0=i0, block_q=block_q, block_k=block_k, rows=rows, k_ref=k_ref,
                           v_ref=v_ref, bias_ref=bias_ref, e_ref=e_ref, lst_ref=lst_ref, cnt_ref=cnt_ref, cap=cap,
                           meta_ref=meta_ref)
    nonempty = l > 0.0
    l_safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(l_safe)) * LN2, jnp.inf)  # natural-log units


def query_block_inputs(q, k, v, bias, e, lists, counts, *, qb, block_q, block_k, r):
    """BlockSpecs and operands shared by the kernels with one program per (batch, query head, query block t):
    q's block [block_q, D], the whole k / v / bias / e of the head's kv group, then the block's key list and count
    (sparse mode: lists given) or its dense-mode metadata (`dense_block_meta`). qb(t) = the block index."""
    length, d = q.shape[1], q.shape[3]
    kvspec = pl.BlockSpec((None, length, None, d), lambda bi, hi, t: (bi, 0, hi // r, 0))
    gspec = pl.BlockSpec((None, None, length), lambda bi, hi, t: (bi, hi // r, 0))
    specs = [pl.BlockSpec((None, block_q, None, d), lambda bi, hi, t: (bi, qb(t), hi, 0)), kvspec, kvspec,
             gspec, gspec]
    args = [q, k, v, bias, e]
    if lists is not None:
        width = lists.shape[-1]
        specs += [pl.BlockSpec((None, None, None, width), lambda bi, hi, t: (bi, hi // r, qb(t), 0)),
                  pl.BlockSpec((None, None, 1), lambda bi, hi, t: (bi, hi // r, qb(t)))]
        args += [lists, counts]
    else:
        specs.append(pl.BlockSpec((None, None, 2), lambda bi, hi, t: (bi, qb(t), 0)))
        args.append(dense_block_meta(e, block_q, block_k))
    return specs, args


@lower_once
def flash_forward(q, k, v, bias, e, lists, counts, *, scale, cap, cfg: DmattnConfig):
    """q [b, L, H, D], k/v [b, L, G, D], bias [b, G, L] f32, e [b, G, L] int32, lists [b, G, nq, W] / counts
    [b, G, nq] int32 or None (dense mode). L a multiple of the blocks. Returns (o [b, L, H, D], lse [b, H, L])."""
    b, length, h, d = q.shape
    g = k.shape[2]
    r = h // g
    bq, bk = cfg.block_q, cfg.block_k
    nq = length // bq
    qb = query_block_index(nq)
    kernel = functools.partial(_fwd_kernel, scale=scale, block_q=bq, block_k=bk, cap=cap, sparse=lists is not None,
                               prec=dot_precision(q.dtype), nq=nq)
    in_specs, args = query_block_inputs(q, k, v, bias, e, lists, counts, qb=qb, block_q=bq, block_k=bk, r=r)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)),
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda bi, hi, t: (bi, qb(t), hi, 0)),
                   pl.BlockSpec((None, None, bq), lambda bi, hi, t: (bi, hi, qb(t)))],
        compiler_params=compiler_params(cfg.num_warps_fwd, cfg.num_stages_fwd),
        interpret=cfg.interpret,
        name="dmattn_fwd",
    )(*args)
