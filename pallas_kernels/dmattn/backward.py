"""Backward flash kernels (Pallas, Triton backend): dq, then dk/dv/d_bias. No atomics, no [L, L] array.

With S_ij = scale q_i.k_j + bias_j on kept (i, j), P = softmax(S), dP = dO V^T, dS = P * (dP - delta),
delta_i = rowsum(O_i * dO_i):
  dq_i = scale sum_j dS_ij k_j,   dk_j = scale sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i,
  d_bias_j = sum_i dS_ij (over kept rows i and the query heads of the kv group; top-k choice held constant).
* dq kernel: one program per (query block, batch, query head), keys visited like the forward
  (`forward.visit_keys`: gathered list / dense prefix / diagonal).
* dk/dv kernel: one program per (key block, batch, kv head), looping over the group's query heads and the
  query rows [min j, max e_j) of its keys; sums over the group in registers (native GQA, no repeat). With a
  contiguous key block, the query blocks past the diagonal whose rows all precede every key's expiry run without
  a mask (plain causal: all of them). Key blocks are launched in ascending order (longest row ranges first). In sparse
  mode the key block is a set of keys regrouped by e_j (`prepass.dkv_key_order`), gathered by index and
  written back by index, so its row range stays near the keys' own visible ranges.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.dmattn.config import DmattnConfig, compiler_params, dot_precision
from pallas_kernels.dmattn.forward import LOG2E, _dot_nn, _dot_nt, query_block_index, query_block_inputs, visit_keys
from pallas_kernels.lowering import lower_once


def _dq_kernel(*refs, scale, block_q, block_k, cap, sparse, prec, nq):
    meta_ref = lst_ref = cnt_ref = None
    if sparse:
        q_ref, k_ref, v_ref, bias_ref, e_ref, do_ref, lse_ref, delta_ref, lst_ref, cnt_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, bias_ref, e_ref, do_ref, lse_ref, delta_ref, meta_ref, dq_ref = refs
    t = query_block_index(nq)(pl.program_id(2))
    i0 = t * block_q
    rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E
    delta = delta_ref[...]
    qk_scale = scale * LOG2E

    def tile(dq, k, v, bias, keep):
        s = _dot_nt(q, k, prec) * qk_scale + (bias * LOG2E)[None, :]
        p = jnp.exp2(s - lse2[:, None])
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        dp = _dot_nt(do, v, prec)
        ds = p * (dp - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k, prec)

    dq = visit_keys(tile, jnp.zeros(q.shape, jnp.float32), i0=i0, block_q=block_q, block_k=block_k, rows=rows,
                    k_ref=k_ref, v_ref=v_ref, bias_ref=bias_ref, e_ref=e_ref, lst_ref=lst_ref, cnt_ref=cnt_ref,
                    cap=cap, meta_ref=meta_ref)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, block_q, block_k, r, length, regrouped, prec, nk):
    qk_scale = scale * LOG2E
    if regrouped:
        (q_ref, k_ref, v_ref, bias_ref, e_ref, do_ref, lse_ref, delta_ref, perm_ref,
         dk_ref, dv_ref, db_ref) = refs
        kidx = perm_ref[...]
        k = k_ref[kidx, :]
        v = v_ref[kidx, :]
        bias = bias_ref[kidx]
        e = e_ref[kidx]
        j_lo = jnp.min(kidx)
    else:
        q_ref, k_ref, v_ref, bias_ref, e_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, db_ref = refs
        kb = pl.program_id(2)
        j_lo = kb * block_k
        kidx = j_lo + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        sl = pl.ds(pl.multiple_of(j_lo, block_k), block_k)
        k, v, bias, e = k_ref[sl, :], v_ref[sl, :], bias_ref[sl], e_ref[sl]
    d = k.shape[-1]
    bias2 = bias * LOG2E
    t_lo = j_lo // block_q
    t_hi = (jnp.minimum(jnp.max(e), length) + block_q - 1) // block_q
    if not regrouped:
        # contiguous key block: query blocks past the diagonal whose rows all precede every key's expiry need no
        # mask; [t_lo, t_diag) and [t_clean, t_hi) are masked
        t_diag = jnp.minimum((j_lo + block_k + block_q - 1) // block_q, t_hi)
        t_clean = jnp.maximum(t_diag, jnp.minimum(jnp.min(e) // block_q, t_hi))
        ranges = ((t_lo, t_diag, True), (t_diag, t_clean, False), (t_clean, t_hi, True))
    else:
        ranges = ((t_lo, t_hi, True),)

    acc = (jnp.zeros((block_k, d), jnp.float32), jnp.zeros((block_k, d), jnp.float32),
           jnp.zeros((block_k,), jnp.float32))
    for hh in range(r):  # query heads of this kv group
        def body(tb, acc, hh=hh, masked=True):
            dk, dv, db = acc
            i0 = pl.multiple_of(tb * block_q, block_q)
            sl = pl.ds(i0, block_q)
            q = q_ref[sl, hh, :]
            do = do_ref[sl, hh, :]
            lse2 = lse_ref[hh, sl] * LOG2E
            delta = delta_ref[hh, sl]
            s = _dot_nt(k, q, prec) * qk_scale + bias2[:, None]
            p = jnp.exp2(s - lse2[None, :])
            if masked:
                rows = i0 + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)
                keep = (kidx[:, None] <= rows[None, :]) & (rows[None, :] < e[:, None])  # [bk, bq]
                p = jnp.where(keep, p, 0.0)
            dv = dv + _dot_nn(p.astype(do.dtype), do, prec)
            dp = _dot_nt(v, do, prec)
            ds = p * (dp - delta[None, :])
            dk = dk + _dot_nn(ds.astype(q.dtype), q, prec)
            db = db + jnp.sum(ds, axis=1)
            return dk, dv, db

        for lo, hi, masked in ranges:
            acc = jax.lax.fori_loop(lo, hi, functools.partial(body, masked=masked), acc)
    dk, dv, db = acc
    dk = (dk * scale).astype(dk_ref.dtype)
    dv = dv.astype(dv_ref.dtype)
    if regrouped:
        cols = jax.lax.broadcasted_iota(jnp.int32, (block_k, d), 1)
        rows2 = jnp.broadcast_to(kidx[:, None], (block_k, d))
        pltr.store(dk_ref.at[rows2, cols], dk)
        pltr.store(dv_ref.at[rows2, cols], dv)
        pltr.store(db_ref.at[kidx], db)
    else:
        dk_ref[...] = dk
        dv_ref[...] = dv
        db_ref[...] = db


@lower_once
def flash_backward(q, k, v, bias, e, o, lse, do, lists, counts, perm, *, scale, cap, cfg: DmattnConfig):
    """Returns dq [b, L, H, D], dk, dv [b, L, G, D] (input dtypes), d_bias [b, G, L] f32."""
    b, length, h, d = q.shape
    g = k.shape[2]
    r = h // g
    prec = dot_precision(q.dtype)
    delta = jnp.einsum("blhd,blhd->bhl", o, do, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)

    # ---- dq
    bq, bk = cfg.block_q_dq, cfg.block_k_dq
    nq = length // bq
    qb = query_block_index(nq)
    kernel = functools.partial(_dq_kernel, scale=scale, block_q=bq, block_k=bk, cap=cap, sparse=lists is not None,
                               prec=prec, nq=nq)
    qspec = pl.BlockSpec((None, bq, None, d), lambda bi, hi, t: (bi, qb(t), hi, 0))
    rowspec = pl.BlockSpec((None, None, bq), lambda bi, hi, t: (bi, hi, qb(t)))
    in_specs, args = query_block_inputs(q, k, v, bias, e, lists, counts, qb=qb, block_q=bq, block_k=bk, r=r)
    # the kernel's refs: q, k, v, bias, e, do, lse, delta, then the mode's lists / metadata
    in_specs[5:5] = [qspec, rowspec, rowspec]
    args[5:5] = [do, lse, delta]
    dq = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, nq),
        in_specs=in_specs,
        out_specs=qspec,
        compiler_params=compiler_params(cfg.num_warps_dq, cfg.num_stages_dq),
        interpret=cfg.interpret,
        name="dmattn_bwd_dq",
    )(*args)

    # ---- dk, dv, d_bias
    bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
    regrouped = perm is not None
    nk = length // bk
    kernel = functools.partial(_dkv_kernel, scale=scale, block_q=bq, block_k=bk, r=r, length=length,
                               regrouped=regrouped, prec=prec, nk=nk)
    # grid (b, G, nk): key blocks slowest, in ascending order = the longest causal row ranges start first
    qgspec = pl.BlockSpec((None, length, r, d), lambda bi, gi, kb: (bi, 0, gi, 0))
    kvspec = pl.BlockSpec((None, length, None, d), lambda bi, gi, kb: (bi, 0, gi, 0))
    gspec = pl.BlockSpec((None, None, length), lambda bi, gi, kb: (bi, gi, 0))
    rowspec = pl.BlockSpec((None, r, length), lambda bi, gi, kb: (bi, gi, 0))
    in_specs = [qgspec, kvspec, kvspec, gspec, gspec, qgspec, rowspec, rowspec]
    args = [q, k, v, bias, e, do, lse, delta]
    if regrouped:
        in_specs.append(pl.BlockSpec((None, None, bk), lambda bi, gi, kb: (bi, gi, kb)))
        args.append(perm)
        out_specs = [kvspec, kvspec, gspec]
    else:
        out_specs = [pl.BlockSpec((None, bk, None, d), lambda bi, gi, kb: (bi, kb, gi, 0)),
                     pl.BlockSpec((None, bk, None, d), lambda bi, gi, kb: (bi, kb, gi, 0)),
                     pl.BlockSpec((None, None, bk), lambda bi, gi, kb: (bi, gi, kb))]
    dk, dv, db = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(bias.shape, jnp.float32)),
        grid=(b, g, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=compiler_params(cfg.num_warps_dkv, cfg.num_stages_dkv),
        interpret=cfg.interpret,
        name="dmattn_bwd_dkv",
    )(*args)
    return dq, dk, dv, db
