"""Pallas (Triton backend) kernels of the Mamba-1 selective scan, forward and backward (glue: ``ops.py``).

Both kernels run one program per (batch row, block of BE channels) and loop over the sequence in chunks of T tokens
(a ``fori_loop``: one ``scf.for``, no unrolled tokens), carrying the block's state h [BE, N] f32 from chunk to
chunk. Inside a chunk everything is a [T, BE, N] tile computed in parallel, the recurrence included: an associative
scan over the T axis (``linear_scan``: Triton's ``tt.scan`` with tuple operands).

* ``scan_fwd`` per chunk (delta = softplus(dt + bias) or dt + bias, 0 on the padded tail; a = 0 at a document start)
      a_t = exp(delta_t A) keep_t,  b_t = delta_t x_t B_t                                   [T, BE, N]
      (P_t, H_t) = scan_t((a, b); (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2))              P_t = prod_{s<=t} a_s
      h_t = H_t + P_t h_in;   y_t = sum_n h_t C_t + D x_t;   y_t *= silu(z_t);   h_in <- h_{T-1}
  writes y, the final state and (``save=True``, under ``jax.vjp``) the state entering every chunk, hs [nc, E, N].
* ``scan_bwd`` per chunk in reverse order: recompute a, b, h_t from hs[c] as above; then with g_t = C_t dy'_t
  (dy' = dy silu(z), and dz from the saved ungated y', both elementwise in the wrapper) the adjoint
  G_t = dL/dh_t = g_t + a_{t+1} G_{t+1} by a reverse scan (kind "adjoint": G_t = K_t + M_t G_in,
  M_t = prod_{t<r<T} a_r, G_in = a_0' G_0' of the chunk after), and
      dC_t = sum_e h_t dy';  dB_t = sum_e G_t delta x;  du = sum_n G_t B_t;  dx = du delta + D dy'
      s_t = G_t a_t h_{t-1} = G_t (h_t - b_t);  d delta = du x + sum_n s A;  dA += sum_t s delta
  dx, ddt per token; dB, dC as per-program partial sums [b, E/(S BE), L, N] (a program walks S sub-blocks of BE
  channels inside each chunk and adds their dB, dC; XLA sums the partials); dA, dD, d dt_bias per (row, channel
  block) summed in registers (dD, d dt_bias as [T, BE], reduced after the loop); the carry after the first chunk is
  the initial state's gradient.
  h_{t-1} never needs a shift (a_t h_{t-1} = h_t - b_t) and neither does a_{t+1} (the "adjoint" combine).
The last row of a tile (the carry) is a masked sum over T.

Layouts (the wrapper pads): x, dt, z, dy [b, Lp, Ep] (input dtypes); B, C [b, Lp, Np] (input dtype); A [Ep, Np] f32;
D, dt_bias [1, Ep] f32; keep [b, Lp] f32 (0 at a document start); states [b, Ep, Np] f32. Lp = nc T; Ep a multiple
of BE (backward: of S BE); Np, BE, S, T powers of two. Every ``pallas_call`` names the Triton backend
(``CompilerParams``), so jax 0.10 and 0.11 lower alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.lowering import lower_once
from pallas_kernels.selective_scan.linear_scan import linear_scan
from pallas_kernels.selective_scan.reference import softplus

_F32 = jnp.float32
_LOG2E = 1.4426950408889634


def _cparams(num_warps, num_stages):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows(c, T):
    """The ds of chunk c's T rows (c a traced loop index or a Python int)."""
    start = c * T
    return pl.ds(start if isinstance(start, int) else pl.multiple_of(start, T), T)


def _split_refs(refs, names):
    """refs in the order of `names` (absent entries skipped) -> dict name -> ref or None."""
    out, it = {}, iter(refs)
    for name, present in names:
        out[name] = next(it) if present else None
    return out


class _Chunk:
    """Loads and the forward recurrence of one chunk of T tokens inside a program whose W = S BE channels are S
    sub-blocks of BE (walked one after the other inside a chunk; the forward has S = 1)."""

    def __init__(self, r, T, L, Lp, BE, S, dt_softplus, with_dy):
        self.r, self.T, self.L, self.Lp, self.BE, self.S, self.sp = r, T, L, Lp, BE, S, dt_softplus
        self.bias = [r["bias"][:, self.cols(j)].astype(_F32) for j in range(S)]     # [1, BE]
        self.A = [r["a"][self.cols(j), :].astype(_F32) for j in range(S)]           # [BE, N]
        # exp(delta A) as exp2(delta A log2 e): ex2.approx, not libdevice's accurate expf
        self.A2 = [A * _LOG2E for A in self.A]
        self.rows = ["x", "dt"] + (["dy"] if with_dy else []) + (["z"] if r["z"] is not None else [])

    def cols(self, j):
        return pl.ds(j * self.BE, self.BE) if self.S > 1 else slice(None)

    def load(self, c):
        """{"b", "c": [T, N], "keep": [T], "sub": [{"x", "dt", ...: [T, BE]} per sub-block]}"""
        sl = _rows(c, self.T)
        d = {n: self.r[n][sl, :] for n in ("b", "c")}
        d["sub"] = [{n: self.r[n][sl, self.cols(j)] for n in self.rows} for j in range(self.S)]
        if self.r["keep"] is not None:
            d["keep"] = self.r["keep"][sl]
        return d

    def delta(self, dt, c, j):
        """(delta [T, BE], d delta / d dt [T, BE]) of raw dt rows; both 0 on the padded tail t >= L."""
        v = dt.astype(_F32) + self.bias[j]
        if self.sp:
            d, dd = softplus(v), jnp.where(v > 20.0, 1.0, jax.nn.sigmoid(v))
        else:
            d, dd = v, jnp.ones_like(v)
        if self.L < self.Lp:
            t = c * self.T + lax.broadcasted_iota(jnp.int32, d.shape, 0)
            live = t < self.L
            d, dd = jnp.where(live, d, 0.0), jnp.where(live, dd, 0.0)
        return d, dd

    def states(self, rows, x, delta, h_in, j):
        """(a, b, h) [T, BE, N] of the chunk: decay, input and the state after every token, from h_in [BE, N]."""
        a = jnp.exp2(delta[:, :, None] * self.A2[j][None])
        if "keep" in rows:
            a = a * rows["keep"][:, None, None]
        u = delta * x.astype(_F32)                                                  # [T, BE]
        bx = u[:, :, None] * rows["b"].astype(_F32)[:, None, :]
        P, H = linear_scan(a, bx)
        return a, bx, H + P * h_in[None]


def _row(v, i):
    """Row i (static) of v [T, ...] as a masked sum over T (no value slicing in the Triton backend)."""
    t = lax.broadcasted_iota(jnp.int32, v.shape, 0)
    return jnp.sum(jnp.where(t == i, v, 0.0), axis=0)


def _chunk_loop(nc, order, body, init, load, prefetch):
    """fori_loop over the nc chunks in `order` ("fwd" | "rev"): body(c, carry, rows) -> carry. With prefetch the
    rows of the next chunk are loaded before the current one is computed and carried (a double buffer)."""
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
def _fwd_kernel(*refs, T, nc, L, dt_softplus, has_z, has_seg, save, prefetch):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("b", 1), ("c", 1), ("a", 1), ("d", 1), ("bias", 1), ("h0", 1),
                           ("z", has_z), ("keep", has_seg), ("y", 1), ("fin", 1), ("hs", save),
                           ("yp", save and has_z)])
    ch = _Chunk(r, T, L, nc * T, r["x"].shape[1], 1, dt_softplus, with_dy=False)
    Dv = r["d"][...].astype(_F32)                                                   # [1, BE]

    def body(c, h_in, rows):
        if save:
            r["hs"][c, :, :] = h_in
        sub = rows["sub"][0]
        delta, _ = ch.delta(sub["dt"], c, 0)
        _, _, h = ch.states(rows, sub["x"], delta, h_in, 0)
        xr = sub["x"].astype(_F32)
        y = jnp.sum(h * rows["c"].astype(_F32)[:, None, :], axis=2) + Dv * xr       # [T, BE]
        if has_z:
            if save:
                r["yp"][_rows(c, T), :] = y.astype(r["yp"].dtype)
            zr = sub["z"].astype(_F32)
            y = y * (zr * jax.nn.sigmoid(zr))
        r["y"][_rows(c, T), :] = y.astype(r["y"].dtype)
        return _row(h, T - 1)

    r["fin"][...] = _chunk_loop(nc, "fwd", body, r["h0"][...].astype(_F32), ch.load, prefetch)


def _specs(Lp, Np, BE):
    seq = pl.BlockSpec((None, Lp, BE), lambda ib, ie: (ib, 0, ie))
    bc = pl.BlockSpec((None, Lp, Np), lambda ib, ie: (ib, 0, 0))
    row = pl.BlockSpec((1, BE), lambda ib, ie: (0, ie))
    state = pl.BlockSpec((None, BE, Np), lambda ib, ie: (ib, ie, 0))
    amat = pl.BlockSpec((BE, Np), lambda ib, ie: (ie, 0))
    keep = pl.BlockSpec((None, Lp), lambda ib, ie: (ib, 0))
    return seq, bc, row, state, amat, keep


@lower_once
def scan_fwd(x, dt, B, C, A, D, bias, h0, z, keep, *, T, L, BE, dt_softplus, save, interpret, prefetch=True,
             num_warps=4, num_stages=2):
    """Returns y [b, Lp, Ep] (x.dtype), final state [b, Ep, Np] f32 and, if save, hs [b, nc, Ep, Np] f32 and (with
    z) the ungated output y' = sum_n h C + D x [b, Lp, Ep] (x.dtype), for the gate's gradient."""
    b, Lp, Ep = x.shape
    Np = B.shape[2]
    nc, nE = Lp // T, Ep // BE
    has_z, has_seg = z is not None, keep is not None
    seq, bc, row, state, amat, keep_spec = _specs(Lp, Np, BE)
    in_specs = [seq, seq, bc, bc, amat, row, row, state]
    args = [x, dt, B, C, A, D, bias, h0]
    if has_z:
        in_specs.append(seq)
        args.append(z)
    if has_seg:
        in_specs.append(keep_spec)
        args.append(keep)
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, Ep, Np), _F32)]
    out_specs = [seq, state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((b, nc, Ep, Np), _F32))
        out_specs.append(pl.BlockSpec((None, nc, BE, Np), lambda ib, ie: (ib, 0, ie, 0)))
    if save and has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype))
        out_specs.append(seq)
    kern = functools.partial(_fwd_kernel, T=T, nc=nc, L=L, dt_softplus=dt_softplus, has_z=has_z,
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
def _bwd_kernel(*refs, T, BE, S, nc, L, dt_softplus, has_seg, prefetch):
    r = _split_refs(refs, [("x", 1), ("dt", 1), ("b", 1), ("c", 1), ("a", 1), ("d", 1), ("bias", 1),
                           ("hs", 1), ("dy", 1), ("dfin", 1), ("z", 0), ("keep", has_seg),
                           ("dx", 1), ("ddt", 1), ("db", 1), ("dc", 1), ("dA", 1), ("dD", 1), ("dbias", 1),
                           ("dh0", 1)])
    ch = _Chunk(r, T, L, nc * T, BE, S, dt_softplus, with_dy=True)
    Dv = [r["d"][:, ch.cols(j)].astype(_F32) for j in range(S)]                     # [1, BE]

    def sub_block(c, j, rows, G_in, dA_acc, dD_acc, db_acc):
        """Chunk c of sub-block j: writes dx, ddt; returns its dB, dC [T, N] and the updated carries."""
        sl, cols, sub, A = _rows(c, T), ch.cols(j), rows["sub"][j], ch.A[j]
        delta, ddelta_ddt = ch.delta(sub["dt"], c, j)
        a, bx, h = ch.states(rows, sub["x"], delta, r["hs"][c, cols, :], j)
        xr, Bc, Cc = sub["x"].astype(_F32), rows["b"].astype(_F32), rows["c"].astype(_F32)
        dyp = sub["dy"].astype(_F32)     # dy' = dy silu(z) (the wrapper applies the gate)
        # everything that needs h first, so that only a and a h_{t-1} = h - b stay live through the adjoint scan
        dC = jnp.sum(h * dyp[:, :, None], axis=1)                                   # [T, N]
        ah = h - bx                                                                 # a_t h_{t-1}
        g = Cc[:, None, :] * dyp[:, :, None]                                        # [T, BE, N]
        _, M, K = linear_scan(a, jnp.ones_like(a), g, kind="adjoint", reverse=True)
        G = K + M * G_in[None]                                                      # dL/dh_t
        u = delta * xr
        dB = jnp.sum(G * u[:, :, None], axis=1)
        du = jnp.sum(G * Bc[:, None, :], axis=2)                                    # [T, BE]
        s = G * ah
        ddt = (du * xr + jnp.sum(s * A[None], axis=2)) * ddelta_ddt
        r["dx"][sl, cols] = (du * delta + Dv[j] * dyp).astype(r["dx"].dtype)
        r["ddt"][sl, cols] = ddt.astype(r["ddt"].dtype)
        dA_acc = dA_acc + jnp.sum(s * delta[:, :, None], axis=0)
        dD_acc = dD_acc + dyp * xr            # [T, BE]: summed over T once, after the loop
        db_acc = db_acc + ddt
        return dB, dC, (_row(a * G, 0), dA_acc, dD_acc, db_acc)

    def body(c, carry, rows):
        dB = dC = None
        new = []
        for j in range(S):   # static: S sub-blocks share the chunk's B, C rows and its dB, dC sums
            dBj, dCj, cj = sub_block(c, j, rows, *carry[j])
            dB, dC = (dBj, dCj) if j == 0 else (dB + dBj, dC + dCj)
            new.append(cj)
        sl = _rows(c, T)
        r["db"][sl, :] = dB
        r["dc"][sl, :] = dC
        return tuple(new)

    zrow = jnp.zeros((T, BE), _F32)
    init = tuple((r["dfin"][ch.cols(j), :].astype(_F32), jnp.zeros((BE, ch.A[j].shape[1]), _F32), zrow, zrow)
                 for j in range(S))
    out = _chunk_loop(nc, "rev", body, init, ch.load, prefetch)
    for j in range(S):
        G, dA_acc, dD_acc, db_acc = out[j]
        cols = ch.cols(j)
        r["dh0"][cols, :] = G
        r["dA"][cols, :] = dA_acc
        r["dD"][:, cols] = jnp.sum(dD_acc, axis=0, keepdims=True)
        r["dbias"][:, cols] = jnp.sum(db_acc, axis=0, keepdims=True)


@lower_once
def scan_bwd(x, dt, B, C, A, D, bias, hs, dy, dfin, keep, *, T, L, BE, dt_softplus, interpret, sub_blocks=1,
             prefetch=True, num_warps=4, num_stages=2):
    """dy: the gradient of the ungated output, dy' = dy silu(z) (the wrapper differentiates the gate).
    Returns dx (x.dtype), ddt (dt.dtype) [b, Lp, Ep]; dB, dC partial sums per program
    [b, Ep/(S BE), Lp, Np] f32; dA [b, Ep, Np], dD, d dt_bias [b, 1, Ep] (per batch row), d h0 [b, Ep, Np] f32.
    Each program owns S = sub_blocks blocks of BE channels (Ep a multiple of S BE)."""
    b, Lp, Ep = x.shape
    Np = B.shape[2]
    W = sub_blocks * BE
    nc, nE = Lp // T, Ep // W
    has_seg = keep is not None
    seq, bc, row, state, amat, keep_spec = _specs(Lp, Np, W)
    in_specs = [seq, seq, bc, bc, amat, row, row,
                pl.BlockSpec((None, nc, W, Np), lambda ib, ie: (ib, 0, ie, 0)), seq, state]
    args = [x, dt, B, C, A, D, bias, hs, dy, dfin]
    if has_seg:
        in_specs.append(keep_spec)
        args.append(keep)
    part = pl.BlockSpec((None, None, Lp, Np), lambda ib, ie: (ib, ie, 0, 0))
    brow = pl.BlockSpec((None, 1, W), lambda ib, ie: (ib, 0, ie))
    out_shape = [jax.ShapeDtypeStruct((b, Lp, Ep), x.dtype), jax.ShapeDtypeStruct((b, Lp, Ep), dt.dtype)]
    out_specs = [seq, seq]
    out_shape += [jax.ShapeDtypeStruct((b, nE, Lp, Np), _F32), jax.ShapeDtypeStruct((b, nE, Lp, Np), _F32),
                  jax.ShapeDtypeStruct((b, Ep, Np), _F32), jax.ShapeDtypeStruct((b, 1, Ep), _F32),
                  jax.ShapeDtypeStruct((b, 1, Ep), _F32), jax.ShapeDtypeStruct((b, Ep, Np), _F32)]
    out_specs += [part, part, state, brow, brow, state]
    kern = functools.partial(_bwd_kernel, T=T, BE=BE, S=sub_blocks, nc=nc, L=L, dt_softplus=dt_softplus,
                             has_seg=has_seg, prefetch=prefetch)
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
    return tuple(outs)
