"""Pallas (Triton backend) kernels of the chunked SSD scan, forward and backward (the glue: ``ops.py``).

* ``chunk_states(x, B, w) -> S``: S_c = sum_s w_s x_s B_s^T per chunk c (p x n, f32), w_s = exp(cs_end - cs_s)
  dt_s [same document as the chunk's last token]. fwd grid (b, nc, h); bwd grid (b, nc, h/hs, Q/T).
* ``state_passing(S, E, h0) -> (Hin, final)``: Hin_0 = h0, Hin_{c+1} = E_c Hin_c + S_c; grid (b, h, p*n/1024),
  sequential over chunks; bwd = the reverse recurrence.
* ``chunk_scan(x, B, C, dt, cs, e, H) -> y'``: y'_t = sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + e_t H_c C_t
  (e_t = exp(cs_t), 0 after a reset in the chunk). fwd grid (b, nc, h, Q/T), flash-attention style over column
  blocks j <= i; bwd grid (b, nc, h/hs, Q/T): hs heads of one group per program, dB/dC summed in registers.

Layouts: x [b, Lp, h, p]; B, C [b, Lp, g, n] (x's dtype); dt, cs, e, w [b, h, Lp] f32; H, S [b, h, nc, p, n] f32;
cnt [b, Lp] int32 (document-reset counts, packed sequences only). Lp = nc Q; Q, T, p, n powers of two >= 16 (the
wrapper pads). Matmul operands in the input dtype (f32: IEEE, not TF32) with f32 accumulation; decays, weights
and states f32. Every ``pallas_call`` names the Triton backend (``CompilerParams``): jax 0.10 and 0.11 lower alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.lowering import lower_once

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims, prec):
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=_F32)


def _prec(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _cparams(num_warps, num_stages):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _decay(cs_r, cs_c, r0, c0, T, cnt_r=None, cnt_c=None):
    """[T, T] exp(cs_r[:, None] - cs_c[None, :]) where row position r0+i >= column position c0+j (and same
    document), else 0."""
    ri = lax.broadcasted_iota(jnp.int32, (T, T), 0) + r0
    ci = lax.broadcasted_iota(jnp.int32, (T, T), 1) + c0
    valid = ri >= ci
    if cnt_r is not None:
        valid = valid & (cnt_r[:, None] == cnt_c[None, :])
    return jnp.exp(jnp.where(valid, cs_r[:, None] - cs_c[None, :], -jnp.inf))


# ------------------------------------------------------------------------------------------------------------
# chunk_states
# ------------------------------------------------------------------------------------------------------------
def _states_fwd_kernel(x_ref, b_ref, w_ref, s_ref, *, Q, T, prec):
    P, N = s_ref.shape

    def body(j, acc):
        sl = pl.ds(pl.multiple_of(j * T, T), T)
        x = x_ref[sl, :]
        xw = (x.astype(_F32) * w_ref[sl][:, None]).astype(x.dtype)
        return acc + _dot(xw, b_ref[sl, :], _TN, prec)

    s_ref[...] = lax.fori_loop(0, Q // T, body, jnp.zeros((P, N), _F32))


@lower_once
def chunk_states_fwd(x, B, w, *, hg, Q, T, interpret, num_warps=4, num_stages=2):
    b, Lp, h, P = x.shape
    N = B.shape[3]
    nc = Lp // Q
    kern = functools.partial(_states_fwd_kernel, Q=Q, T=T, prec=_prec(x.dtype))
    return pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((b, h, nc, P, N), _F32),
        grid=(b, nc, h),
        in_specs=[
            pl.BlockSpec((None, Q, None, P), lambda ib, ic, ih: (ib, ic, ih, 0)),
            pl.BlockSpec((None, Q, None, N), lambda ib, ic, ih: (ib, ic, ih // hg, 0)),
            pl.BlockSpec((None, None, Q), lambda ib, ic, ih: (ib, ih, ic)),
        ],
        out_specs=pl.BlockSpec((None, None, None, P, N), lambda ib, ic, ih: (ib, ih, ic, 0, 0)),
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_chunk_states_fwd",
    )(x, B, w)


def _states_bwd_kernel(x_ref, b_ref, w_ref, ds_ref, dx_ref, db_ref, dw_ref, *, hs, prec):
    Bm = b_ref[...]

    def head(hh, dB):
        x = x_ref[:, hh, :]
        w = w_ref[hh, :]
        dS = ds_ref[hh, :, :].astype(x.dtype)
        BdS = _dot(Bm, dS, _NT, prec)           # [T, P]
        xdS = _dot(x, dS, _NN, prec)            # [T, N]
        dx_ref[:, hh, :] = w[:, None] * BdS
        dw_ref[hh, :] = jnp.sum(x.astype(_F32) * BdS, axis=1)
        return dB + w[:, None] * xdS

    db_ref[...] = lax.fori_loop(0, hs, head, jnp.zeros(db_ref.shape, _F32))


@lower_once
def chunk_states_bwd(x, B, w, dS, *, hg, Q, T, interpret, hs=1, num_warps=4, num_stages=2):
    """Returns dx [b, Lp, h, P] f32, dB summed over blocks of hs heads [b, Lp, h // hs, N] f32, dw [b, h, Lp]."""
    b, Lp, h, P = x.shape
    N = B.shape[3]
    nc, K = Lp // Q, Q // T
    kern = functools.partial(_states_bwd_kernel, hs=hs, prec=_prec(x.dtype))
    return pl.pallas_call(
        kern,
        out_shape=[
            jax.ShapeDtypeStruct((b, Lp, h, P), _F32),
            jax.ShapeDtypeStruct((b, Lp, h // hs, N), _F32),
            jax.ShapeDtypeStruct((b, h, Lp), _F32),
        ],
        grid=(b, nc, h // hs, K),
        in_specs=[
            pl.BlockSpec((None, T, hs, P), lambda ib, ic, ih, k: (ib, ic * K + k, ih, 0)),
            pl.BlockSpec((None, T, None, N), lambda ib, ic, ih, k: (ib, ic * K + k, (ih * hs) // hg, 0)),
            pl.BlockSpec((None, hs, T), lambda ib, ic, ih, k: (ib, ih, ic * K + k)),
            pl.BlockSpec((None, hs, None, P, N), lambda ib, ic, ih, k: (ib, ih, ic, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, T, hs, P), lambda ib, ic, ih, k: (ib, ic * K + k, ih, 0)),
            pl.BlockSpec((None, T, None, N), lambda ib, ic, ih, k: (ib, ic * K + k, ih, 0)),
            pl.BlockSpec((None, hs, T), lambda ib, ic, ih, k: (ib, ih, ic * K + k)),
        ],
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_chunk_states_bwd",
    )(x, B, w, dS)


# ------------------------------------------------------------------------------------------------------------
# chunk_scan
# ------------------------------------------------------------------------------------------------------------
def _scan_fwd_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, e_ref, h_ref, *rest, T, prec, has_seg):
    rest = list(rest)
    cnt_ref = rest.pop(0) if has_seg else None
    (y_ref,) = rest
    i = pl.program_id(3)
    r0 = pl.multiple_of(i * T, T)
    rows = pl.ds(r0, T)
    Ci = c_ref[rows, :]
    cs_i = cs_ref[rows]
    cnt_i = cnt_ref[rows] if has_seg else None
    H = h_ref[...].astype(Ci.dtype)
    acc = e_ref[rows][:, None] * _dot(Ci, H, _NT, prec)   # [T, P]

    def body(j, acc):
        c0 = pl.multiple_of(j * T, T)
        cols = pl.ds(c0, T)
        xj = x_ref[cols, :]
        CB = _dot(Ci, b_ref[cols, :], _NT, prec)                                     # [T, T]
        dec = _decay(cs_i, cs_ref[cols], r0, c0, T, cnt_i, cnt_ref[cols] if has_seg else None)
        W = CB * dec * dt_ref[cols][None, :]
        return acc + _dot(W.astype(xj.dtype), xj, _NN, prec)

    acc = lax.fori_loop(0, i + 1, body, acc)
    y_ref[...] = acc.astype(y_ref.dtype)


@lower_once
def chunk_scan_fwd(x, B, C, dt, cs, e, H, cnt, *, hg, Q, T, interpret, num_warps=4, num_stages=2):
    """y' [b, Lp, h, P] in x.dtype."""
    b, Lp, h, P = x.shape
    N = B.shape[3]
    nc, K = Lp // Q, Q // T
    has_seg = cnt is not None
    kern = functools.partial(_scan_fwd_kernel, T=T, prec=_prec(x.dtype), has_seg=has_seg)
    chunk_x = pl.BlockSpec((None, Q, None, P), lambda ib, ic, ih, i: (ib, ic, ih, 0))
    chunk_bc = pl.BlockSpec((None, Q, None, N), lambda ib, ic, ih, i: (ib, ic, ih // hg, 0))
    chunk_v = pl.BlockSpec((None, None, Q), lambda ib, ic, ih, i: (ib, ih, ic))
    in_specs = [chunk_x, chunk_bc, chunk_bc, chunk_v, chunk_v, chunk_v,
                pl.BlockSpec((None, None, None, P, N), lambda ib, ic, ih, i: (ib, ih, ic, 0, 0))]
    args = [x, B, C, dt, cs, e, H]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, Q), lambda ib, ic, ih, i: (ib, ic)))
        args.append(cnt)
    return pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((b, Lp, h, P), x.dtype),
        grid=(b, nc, h, K),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, T, None, P), lambda ib, ic, ih, i: (ib, ic * K + i, ih, 0)),
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_chunk_scan_fwd",
    )(*args)


def _scan_bwd_kernel(x_ref, b_ref, c_ref, dt_ref, cs_ref, e_ref, h_ref, dy_ref, *rest, T, K, hs, prec, has_seg):
    rest = list(rest)
    cnt_ref = rest.pop(0) if has_seg else None
    outs = rest
    dx_ref, db_ref, dc_ref, ddt_ref, rt_ref, de_ref, dh_ref = outs
    P, N = h_ref.shape[-2:]
    k = pl.program_id(3)
    k0 = pl.multiple_of(k * T, T)
    blk = pl.ds(k0, T)
    seg = (lambda sl: cnt_ref[sl]) if has_seg else (lambda sl: None)
    Bk = b_ref[blk, :]
    Ck = c_ref[blk, :]
    Ckf = Ck.astype(_F32)
    cntk = seg(blk)

    def head(hh, carry):
        dB, dC = carry
        # ---- column side: tokens s of block k receive from rows t >= s (row blocks i >= k) ----
        xk = x_ref[blk, hh, :]
        dtk = dt_ref[hh, blk]
        csk = cs_ref[hh, blk]

        def col_body(i, cc):
            gx, gB = cc
            r0 = pl.multiple_of(i * T, T)
            rows = pl.ds(r0, T)
            Ci = c_ref[rows, :]
            dyi = dy_ref[rows, hh, :]
            dec = _decay(cs_ref[hh, rows], csk, r0, k0, T, seg(rows), cntk)   # [Ti, Tk]
            CB = _dot(Ci, Bk, _NT, prec)
            Wt = (CB * dec).astype(dyi.dtype)
            gx = gx + _dot(Wt, dyi, _TN, prec)                                  # [Tk, P]
            G = (_dot(dyi, xk, _NT, prec) * dec).astype(Ci.dtype)
            gB = gB + _dot(G, Ci, _TN, prec)                                    # [Tk, N]
            return gx, gB

        gx, gB = lax.fori_loop(k, K, col_body, (jnp.zeros((T, P), _F32), jnp.zeros((T, N), _F32)))
        dx_ref[:, hh, :] = dtk[:, None] * gx
        ddt_ref[hh, :] = jnp.sum(xk.astype(_F32) * gx, axis=1)
        dB = dB + dtk[:, None] * gB

        # ---- row side: tokens t of block k read columns s <= t (column blocks j <= k) ----
        dyk = dy_ref[blk, hh, :]

        def row_body(j, gC):
            c0 = pl.multiple_of(j * T, T)
            cols = pl.ds(c0, T)
            xj = x_ref[cols, hh, :]
            dec = _decay(csk, cs_ref[hh, cols], k0, c0, T, cntk, seg(cols))
            G = (_dot(dyk, xj, _NT, prec) * dec * dt_ref[hh, cols][None, :]).astype(xj.dtype)
            return gC + _dot(G, b_ref[cols, :], _NN, prec)                    # [Tk, N]

        gC = lax.fori_loop(0, k + 1, row_body, jnp.zeros((T, N), _F32))
        H = h_ref[hh, :, :].astype(dyk.dtype)
        dyH = _dot(dyk, H, _NN, prec)                                           # [Tk, N]
        de_ref[hh, :] = jnp.sum(Ckf * dyH, axis=1)
        rt_ref[hh, :] = jnp.sum(Ckf * gC, axis=1)
        dC = dC + gC + e_ref[hh, blk][:, None] * dyH
        return dB, dC

    zN = jnp.zeros((T, N), _F32)
    dB, dC = lax.fori_loop(0, hs, head, (zN, zN))
    db_ref[...] = dB
    dc_ref[...] = dC

    # ---- dH_c = sum_t e_t dy_t C_t^T (program k = 0 of each chunk) ----
    @pl.when(k == 0)
    def _():
        def dh_head(hh, _):
            def dh_body(i, acc):
                rows = pl.ds(pl.multiple_of(i * T, T), T)
                dyi = dy_ref[rows, hh, :]
                dye = (dyi.astype(_F32) * e_ref[hh, rows][:, None]).astype(dyi.dtype)
                return acc + _dot(dye, c_ref[rows, :], _TN, prec)
            dh_ref[hh, :, :] = lax.fori_loop(0, K, dh_body, jnp.zeros((P, N), _F32))
            return 0
        lax.fori_loop(0, hs, dh_head, 0)


@lower_once
def chunk_scan_bwd(x, B, C, dt, cs, e, H, cnt, dy, *, hg, Q, T, interpret, hs=1, num_warps=4, num_stages=2):
    """Returns dx [b,Lp,h,P]; dB, dC summed over blocks of hs heads [b,Lp,h//hs,N]; ddt, rowterm, de [b,h,Lp];
    dH [b,h,nc,P,N]; all f32.  rowterm_t = C_t . (intra-chunk part of dC_t); d cs_t = rowterm_t - dt_t ddt_t."""
    b, Lp, h, P = x.shape
    N = B.shape[3]
    nc, K = Lp // Q, Q // T
    has_seg = cnt is not None
    kern = functools.partial(_scan_bwd_kernel, T=T, K=K, hs=hs, prec=_prec(x.dtype), has_seg=has_seg)
    chunk_x = pl.BlockSpec((None, Q, hs, P), lambda ib, ic, ih, k: (ib, ic, ih, 0))
    chunk_bc = pl.BlockSpec((None, Q, None, N), lambda ib, ic, ih, k: (ib, ic, (ih * hs) // hg, 0))
    chunk_v = pl.BlockSpec((None, hs, Q), lambda ib, ic, ih, k: (ib, ih, ic))
    state = pl.BlockSpec((None, hs, None, P, N), lambda ib, ic, ih, k: (ib, ih, ic, 0, 0))
    in_specs = [chunk_x, chunk_bc, chunk_bc, chunk_v, chunk_v, chunk_v, state, chunk_x]
    args = [x, B, C, dt, cs, e, H, dy]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, Q), lambda ib, ic, ih, k: (ib, ic)))
        args.append(cnt)
    blk_p = pl.BlockSpec((None, T, hs, P), lambda ib, ic, ih, k: (ib, ic * K + k, ih, 0))
    blk_n = pl.BlockSpec((None, T, None, N), lambda ib, ic, ih, k: (ib, ic * K + k, ih, 0))
    blk_v = pl.BlockSpec((None, hs, T), lambda ib, ic, ih, k: (ib, ih, ic * K + k))
    return pl.pallas_call(
        kern,
        out_shape=[
            jax.ShapeDtypeStruct((b, Lp, h, P), _F32),
            jax.ShapeDtypeStruct((b, Lp, h // hs, N), _F32),
            jax.ShapeDtypeStruct((b, Lp, h // hs, N), _F32),
            jax.ShapeDtypeStruct((b, h, Lp), _F32),
            jax.ShapeDtypeStruct((b, h, Lp), _F32),
            jax.ShapeDtypeStruct((b, h, Lp), _F32),
            jax.ShapeDtypeStruct((b, h, nc, P, N), _F32),
        ],
        grid=(b, nc, h // hs, K),
        in_specs=in_specs,
        out_specs=[blk_p, blk_n, blk_n, blk_v, blk_v, blk_v, state],
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_chunk_scan_bwd",
    )(*args)


# ------------------------------------------------------------------------------------------------------------
# state passing across chunks: Hin[0] = h0, Hin[c+1] = E_c Hin[c] + S_c (sequential over chunks, parallel over
# (b, h, blocks of the flattened p*n state)); backward is the reverse recurrence.
# ------------------------------------------------------------------------------------------------------------
def _pass_fwd_kernel(s_ref, e_ref, h0_ref, hin_ref, fin_ref, *, nc):
    def body(c, Hc):
        hin_ref[c, :] = Hc
        return e_ref[c] * Hc + s_ref[c, :]

    fin_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...])


@lower_once
def state_passing_fwd(S, E, h0, *, interpret, block=1024, num_warps=4, num_stages=2):
    """S [b, h, nc, M] f32, E [b, h, nc] f32, h0 [b, h, M] -> (Hin [b, h, nc, M], final [b, h, M])."""
    b, h, nc, M = S.shape
    blk = min(block, M)
    kern = functools.partial(_pass_fwd_kernel, nc=nc)
    return pl.pallas_call(
        kern,
        out_shape=[jax.ShapeDtypeStruct((b, h, nc, M), _F32), jax.ShapeDtypeStruct((b, h, M), _F32)],
        grid=(b, h, M // blk),
        in_specs=[
            pl.BlockSpec((None, None, nc, blk), lambda ib, ih, j: (ib, ih, 0, j)),
            pl.BlockSpec((None, None, nc), lambda ib, ih, j: (ib, ih, 0)),
            pl.BlockSpec((None, None, blk), lambda ib, ih, j: (ib, ih, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, nc, blk), lambda ib, ih, j: (ib, ih, 0, j)),
            pl.BlockSpec((None, None, blk), lambda ib, ih, j: (ib, ih, j)),
        ],
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_state_passing_fwd",
    )(S, E, h0)


def _pass_bwd_kernel(e_ref, hin_ref, dhin_ref, dfin_ref, ds_ref, dh0_ref, de_ref, *, nc):
    def body(i, G):
        c = nc - 1 - i
        ds_ref[c, :] = G
        de_ref[c] = jnp.sum(G * hin_ref[c, :])
        return dhin_ref[c, :] + e_ref[c] * G

    dh0_ref[...] = lax.fori_loop(0, nc, body, dfin_ref[...])


@lower_once
def state_passing_bwd(E, Hin, dHin, dfin, *, interpret, block=1024, num_warps=4, num_stages=2):
    """Returns dS [b, h, nc, M], dh0 [b, h, M], dE partial sums [b, h, M // block, nc] (sum over axis 2)."""
    b, h, nc, M = Hin.shape
    blk = min(block, M)
    nb = M // blk
    kern = functools.partial(_pass_bwd_kernel, nc=nc)
    return pl.pallas_call(
        kern,
        out_shape=[jax.ShapeDtypeStruct((b, h, nc, M), _F32), jax.ShapeDtypeStruct((b, h, M), _F32),
                   jax.ShapeDtypeStruct((b, h, nb, nc), _F32)],
        grid=(b, h, nb),
        in_specs=[
            pl.BlockSpec((None, None, nc), lambda ib, ih, j: (ib, ih, 0)),
            pl.BlockSpec((None, None, nc, blk), lambda ib, ih, j: (ib, ih, 0, j)),
            pl.BlockSpec((None, None, nc, blk), lambda ib, ih, j: (ib, ih, 0, j)),
            pl.BlockSpec((None, None, blk), lambda ib, ih, j: (ib, ih, j)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, nc, blk), lambda ib, ih, j: (ib, ih, 0, j)),
            pl.BlockSpec((None, None, blk), lambda ib, ih, j: (ib, ih, j)),
            pl.BlockSpec((None, None, None, nc), lambda ib, ih, j: (ib, ih, j, 0)),
        ],
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="ssd_state_passing_bwd",
    )(E, Hin, dHin, dfin)
