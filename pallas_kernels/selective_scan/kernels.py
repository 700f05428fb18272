"""Pallas (Triton backend) kernels of the Mamba-1 selective scan, forward and backward (glue: ``ops.py``).

Both kernels run one program per (batch row, block of BE channels) and walk the sequence in order (forward) or in
reverse (backward) with the state of the block, ``h [N, BE]`` f32, carried in registers. The sequence is cut into
chunks of K tokens: a ``fori_loop`` over chunks whose body is the K tokens unrolled (static Python loop). The rows
of a chunk (x, dt, z, dy [1, BE]; B, C columns [N, 1]) are all loaded before the chunk's serial update (the stores
of y in between would otherwise keep the compiler from hoisting them); with ``prefetch`` the next chunk's rows are
loaded before the current chunk is computed and carried through the loop (double-buffered in registers).

* ``scan_fwd``: per token t (delta = softplus(dt + bias) or dt + bias, 0 on the padded tail)
      h = keep_t exp(delta A) h + B_t (delta x_t);   y_t = sum_n C_t[n] h[n, :] + D x_t;   y_t *= silu(z_t)
  writes y, the final state and (``save=True``, under ``jax.vjp``) the state entering every chunk, hs [nc, N, E].
* ``scan_bwd``: per chunk in reverse order, the K states entering its tokens are recomputed from hs[c] and kept in
  registers (K SSA values; the decays exp(delta A) are recomputed in the walk rather than kept), then the tokens
  are walked backwards with the adjoint G = dL/dh_t:
      dy' = dy silu(z);  G += C_t dy';  dC_t = sum_e h_t dy';  dB_t = sum_e G delta x;  du = sum_n G B_t
      dx = du delta + D dy';  s = G h_{t-1} dA;  d delta = du x + sum_n s A;  dA += s delta;  G = G dA
  dx, ddt (and dz) are written per token; dB, dC as per-channel-block partial sums [b, E/BE, N, L] (summed by XLA);
  dA, dD, d dt_bias per (batch row, channel block) summed in registers; G after the first token = d initial state.

Layouts (the wrapper pads and transposes): x, dt, z, dy [b, Lp, Ep] (input dtypes); B, C transposed to
[b, Np, Lp]; A transposed to [Np, Ep] f32; D, dt_bias [1, Ep] f32; keep [b, 1, Lp] f32 (0 at a document start);
states [b, Np, Ep] f32. Lp = nc K, Ep a multiple of BE, Np, BE, K powers of two. Every ``pallas_call`` names the
Triton backend (``CompilerParams``), so jax 0.10 and 0.11 lower alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.selective_scan.reference import softplus

_F32 = jnp.float32
_LOG2E = 1.4426950408889634


def _cparams(num_warps, num_stages):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


class _Chunk:
    """Loads and per-token helpers of one program. ``load(c)`` reads the rows of the K tokens of chunk c (all loads
    issued before any use, so they overlap; with prefetch the kernels load chunk c +- 1 while computing c)."""

    def __init__(self, refs, K, L, Lp, bias, A, dt_softplus, with_dy):
        self.refs, self.K, self.L, self.Lp = refs, K, L, Lp
        self.bias, self.sp = bias, dt_softplus
        self.A2 = A * _LOG2E   # exp(delta A) as exp2(delta A log2 e): ex2.approx, not libdevice's accurate expf
        rows = ["x", "dt"] + (["dy"] if with_dy else []) + [n for n in ("z",) if refs[n] is not None]
        self.rows = rows
        self.cols = ["bt", "ct"] + (["keep"] if refs["keep"] is not None else [])

    def load(self, c):
        out = []
        for i in range(self.K):
            t = c * self.K + i
            d = {n: self.refs[n][pl.ds(t, 1), :] for n in self.rows}                # [1, BE]
            d.update({n: self.refs[n][:, pl.ds(t, 1)] for n in self.cols})          # [N, 1] / [1, 1]
            out.append(d)
        return out

    def delta(self, dt_row, t):
        """(delta [1, BE], d delta / d dt [1, BE]) of a raw dt row; both 0 on the padded tail t >= L."""
        v = dt_row.astype(_F32) + self.bias
        if self.sp:
            d, dd = softplus(v), jnp.where(v > 20.0, 1.0, jax.nn.sigmoid(v))
        else:
            d, dd = v, jnp.ones_like(v)
        if self.L < self.Lp:
            live = t < self.L
            d, dd = jnp.where(live, d, 0.0), jnp.where(live, dd, 0.0)
        return d, dd

    def decay(self, row, delta):
        dA = jnp.exp2(delta * self.A2)                                                # [N, BE]
        if "keep" in row:
            dA = dA * row["keep"]
        return dA


def _split_refs(refs, names):
    """refs in the order of `names` (absent entries skipped) -> dict name -> ref or None."""
    out, it = {}, iter(refs)
    for name, present in names:
        out[name] = next(it) if present else None
    return out


def _chunk_loop(nc, order, body, init, load, prefetch):
    """fori_loop over the nc chunks in `order` ("fwd" | "rev"): body(c, carry, rows) -> carry. With prefetch the
    rows of the next chunk are loaded before the current one is computed and carried in registers."""
    chunk_of = (lambda j: j) if order == "fwd" else (lambda j: nc - 1 - j)
    if not prefetch:
        return lax.fori_loop(0, nc, lambda j, carry: body(chunk_of(j), carry, load(chunk_of(j))), init)

    def step(j, carry):
        inner, rows = carry
        nxt = load(chunk_of(jnp.minimum(j + 1, nc - 1)))
        return body(chunk_of(j), inner, rows), nxt

    return lax.fori_loop(0, nc, step, (init, load(chunk_of(0))))[0]


# ------------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------------
def _fwd_kernel(*refs, K, nc, L, dt_softplus, has_z, has_seg, save, prefetch):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("bt", 1), ("ct", 1), ("at", 1), ("d", 1), ("bias", 1), ("h0", 1),
                           ("z", has_z), ("keep", has_seg), ("y", 1), ("fin", 1), ("hs", save)])
    A = r["at"][...].astype(_F32)
    Dv = r["d"][...].astype(_F32)
    ch = _Chunk(r, K, L, nc * K, r["bias"][...].astype(_F32), A, dt_softplus, with_dy=False)
    y_ref = r["y"]

    def body(c, h, rows):
        if save:
            r["hs"][c, :, :] = h
        for i in range(K):
            t = c * K + i
            rw = rows[i]
            xr = rw["x"].astype(_F32)
            delta, _ = ch.delta(rw["dt"], t)
            h = ch.decay(rw, delta) * h + rw["bt"].astype(_F32) * (delta * xr)
            y = jnp.sum(h * rw["ct"].astype(_F32), axis=0, keepdims=True) + Dv * xr
            if has_z:
                zr = rw["z"].astype(_F32)
                y = y * (zr * jax.nn.sigmoid(zr))
            y_ref[pl.ds(t, 1), :] = y.astype(y_ref.dtype)
        return h

    r["fin"][...] = _chunk_loop(nc, "fwd", body, r["h0"][...].astype(_F32), ch.load, prefetch)


def scan_fwd(x, dt, Bt, Ct, At, D, bias, h0, z, keep, *, K, L, BE, dt_softplus, save, interpret, prefetch=True,
             num_warps=4, num_stages=2):
    """Returns y [b, Lp, Ep] (x.dtype), final state [b, Np, Ep] f32 and, if save, hs [b, nc, Np, Ep] f32."""
    b, Lp, Ep = x.shape
    Np = Bt.shape[1]
    nc, nE = Lp // K, Ep // BE
    has_z, has_seg = z is not None, keep is not None
    seq = pl.BlockSpec((None, Lp, BE), lambda ib, ie: (ib, 0, ie))
    bc = pl.BlockSpec((None, Np, Lp), lambda ib, ie: (ib, 0, 0))
    row = pl.BlockSpec((1, BE), lambda ib, ie: (0, ie))
    state = pl.BlockSpec((None, Np, BE), lambda ib, ie: (ib, 0, ie))
    in_specs = [seq, seq, bc, bc, pl.BlockSpec((Np, BE), lambda ib, ie: (0, ie)), row, row, state]
    args = [x, dt, Bt, Ct, At, D, bias, h0]
    if has_z:
        in_specs.append(seq)
        args.append(z)
    if has_seg:
        in_specs.append(pl.BlockSpec((None, 1, Lp), lambda ib, ie: (ib, 0, 0)))
        args.append(keep)
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, Np, Ep), _F32)]
    out_specs = [seq, state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((b, nc, Np, Ep), _F32))
        out_specs.append(pl.BlockSpec((None, nc, Np, BE), lambda ib, ie: (ib, 0, 0, ie)))
    kern = functools.partial(_fwd_kernel, K=K, nc=nc, L=L, dt_softplus=dt_softplus, has_z=has_z,
                             has_seg=has_seg, save=save, prefetch=prefetch)
    return pl.pallas_call(
        kern,
        out_shape=out_shape,
        grid=(b, nE),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="selective_scan_fwd",
    )(*args)


# ------------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------------
def _bwd_kernel(*refs, K, nc, L, dt_softplus, has_z, has_seg, prefetch):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("bt", 1), ("ct", 1), ("at", 1), ("d", 1), ("bias", 1),
                           ("hs", 1), ("dy", 1), ("dfin", 1), ("z", has_z), ("keep", has_seg),
                           ("dx", 1), ("ddt", 1), ("dz", has_z), ("dbt", 1), ("dct", 1), ("dA", 1), ("dD", 1),
                           ("dbias", 1), ("dh0", 1)])
    A = r["at"][...].astype(_F32)
    Dv = r["d"][...].astype(_F32)
    ch = _Chunk(r, K, L, nc * K, r["bias"][...].astype(_F32), A, dt_softplus, with_dy=True)
    dx_ref, ddt_ref, dz_ref, dbt_ref, dct_ref = r["dx"], r["ddt"], r["dz"], r["dbt"], r["dct"]

    def body(c, carry, rows):
        G, dA_acc, dD_acc, db_acc = carry
        # the states entering each token, recomputed from hs[c], and the step sizes (registers); the rest of the
        # per-token values are recomputed from the loaded rows in the walk (fewer live registers)
        steps = []
        h = r["hs"][c, :, :]
        hp = [h]
        for i in range(K):
            t = c * K + i
            rw = rows[i]
            delta, ddelta_ddt = ch.delta(rw["dt"], t)
            h = ch.decay(rw, delta) * h + rw["bt"].astype(_F32) * (delta * rw["x"].astype(_F32))
            hp.append(h)
            steps.append((delta, ddelta_ddt))
        # reverse walk with the adjoint G = dL/dh_t
        for i in reversed(range(K)):
            t = c * K + i
            row = pl.ds(t, 1)
            rw = rows[i]
            delta, ddelta_ddt = steps[i]
            xr, Bc = rw["x"].astype(_F32), rw["bt"].astype(_F32)
            u = delta * xr                                                          # [1, BE]
            dA = ch.decay(rw, delta)   # recomputed rather than kept: K fewer [N, BE] registers
            Cc = rw["ct"].astype(_F32)
            h_prev, h_t = hp[i], hp[i + 1]
            dyr = rw["dy"].astype(_F32)
            if has_z:
                zr = rw["z"].astype(_F32)
                sz = jax.nn.sigmoid(zr)
                ypre = jnp.sum(h_t * Cc, axis=0, keepdims=True) + Dv * xr
                dz_ref[row, :] = (dyr * ypre * sz * (1.0 + zr * (1.0 - sz))).astype(dz_ref.dtype)
                dyp = dyr * zr * sz
            else:
                dyp = dyr
            G = G + Cc * dyp                                                        # [N, BE]
            dct_ref[:, row] = jnp.sum(h_t * dyp, axis=1, keepdims=True)
            dbt_ref[:, row] = jnp.sum(G * u, axis=1, keepdims=True)
            du = jnp.sum(G * Bc, axis=0, keepdims=True)                             # [1, BE]
            s = G * h_prev * dA
            ddt = (du * xr + jnp.sum(s * A, axis=0, keepdims=True)) * ddelta_ddt
            dx_ref[row, :] = (du * delta + Dv * dyp).astype(dx_ref.dtype)
            ddt_ref[row, :] = ddt.astype(ddt_ref.dtype)
            dA_acc = dA_acc + s * delta
            dD_acc = dD_acc + dyp * xr
            db_acc = db_acc + ddt
            G = G * dA
        return G, dA_acc, dD_acc, db_acc

    zrow = jnp.zeros(Dv.shape, _F32)
    init = (r["dfin"][...].astype(_F32), jnp.zeros(A.shape, _F32), zrow, zrow)
    G, dA_acc, dD_acc, db_acc = _chunk_loop(nc, "rev", body, init, ch.load, prefetch)
    r["dh0"][...] = G
    r["dA"][...] = dA_acc
    r["dD"][...] = dD_acc
    r["dbias"][...] = db_acc


def scan_bwd(x, dt, Bt, Ct, At, D, bias, hs, dy, dfin, z, keep, *, K, L, BE, dt_softplus, interpret, prefetch=False,
             num_warps=4, num_stages=2):
    """Returns dx (x.dtype), ddt (dt.dtype), dz (z.dtype, or None) [b, Lp, Ep]; dB, dC partial sums per channel
    block [b, Ep/BE, Np, Lp] f32; dA [b, Np, Ep], dD, d dt_bias [b, 1, Ep] (per batch row), d h0 [b, Np, Ep] f32."""
    b, Lp, Ep = x.shape
    Np = Bt.shape[1]
    nc, nE = Lp // K, Ep // BE
    has_z, has_seg = z is not None, keep is not None
    seq = pl.BlockSpec((None, Lp, BE), lambda ib, ie: (ib, 0, ie))
    bc = pl.BlockSpec((None, Np, Lp), lambda ib, ie: (ib, 0, 0))
    row = pl.BlockSpec((1, BE), lambda ib, ie: (0, ie))
    state = pl.BlockSpec((None, Np, BE), lambda ib, ie: (ib, 0, ie))
    in_specs = [seq, seq, bc, bc, pl.BlockSpec((Np, BE), lambda ib, ie: (0, ie)), row, row,
                pl.BlockSpec((None, nc, Np, BE), lambda ib, ie: (ib, 0, 0, ie)), seq, state]
    args = [x, dt, Bt, Ct, At, D, bias, hs, dy, dfin]
    if has_z:
        in_specs.append(seq)
        args.append(z)
    if has_seg:
        in_specs.append(pl.BlockSpec((None, 1, Lp), lambda ib, ie: (ib, 0, 0)))
        args.append(keep)
    part = pl.BlockSpec((None, None, Np, Lp), lambda ib, ie: (ib, ie, 0, 0))
    brow = pl.BlockSpec((None, 1, BE), lambda ib, ie: (ib, 0, ie))
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, Lp, Ep), dt.dtype)]
    out_specs = [seq, seq]
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, Lp, Ep), z.dtype))
        out_specs.append(seq)
    out_shape += [jax.ShapeDtypeStruct((b, nE, Np, Lp), _F32), jax.ShapeDtypeStruct((b, nE, Np, Lp), _F32),
                  jax.ShapeDtypeStruct((b, Np, Ep), _F32), jax.ShapeDtypeStruct((b, 1, Ep), _F32),
                  jax.ShapeDtypeStruct((b, 1, Ep), _F32), jax.ShapeDtypeStruct((b, Np, Ep), _F32)]
    out_specs += [part, part, state, brow, brow, state]
    kern = functools.partial(_bwd_kernel, K=K, nc=nc, L=L, dt_softplus=dt_softplus, has_z=has_z, has_seg=has_seg,
                             prefetch=prefetch)
    outs = pl.pallas_call(
        kern,
        out_shape=out_shape,
        grid=(b, nE),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=_cparams(num_warps, num_stages),
        interpret=interpret,
        name="selective_scan_bwd",
    )(*args)
    outs = list(outs)
    if not has_z:
        outs.insert(2, None)
    return tuple(outs)
