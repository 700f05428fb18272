"""The public op ``selective_scan_pallas``: jnp glue (pad) + a custom_vjp around ``kernels.py``.

Forward:  pad L to whole parts of cpp chunks of T tokens, E to the channel block, N to a power of two; with more
          than one part ``scan_part_fwd`` (each part's end state from zero and decay product), then ``scan_fwd``
          (every part at once from the state its summaries fold to: y with D skip and z gate fused, final state)
          -> slice.
Backward: ``scan_fwd(save=True)`` under the VJP keeps the state entering every chunk (and, with z, the ungated
          output y'); the gate's gradient dz = dy y' d silu(z) and dy' = dy silu(z) are elementwise jnp; with more
          than one part ``scan_part_bwd`` (each part's adjoint from zero past its end, decay product);
          ``scan_bwd`` recomputes each chunk's states and runs the reverse (adjoint) scan, every part at once (dx,
          ddt, dB/dC partials, dA, dD, d dt_bias, d h0). JAX differentiates the glue.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan import kernels as K
from pallas_kernels.selective_scan.reference import check_shapes, segment_keep
from pallas_kernels.selective_scan.tuning import SelectiveScanTuning, current

__all__ = ["selective_scan_pallas"]

_F32 = jnp.float32


def _next_pow2(v):
    r = 1
    while r < v:
        r *= 2
    return r


def _pad(a, widths, value=0):
    """Pads axis i of a at the end by widths[i] (dict axis -> count)."""
    if all(v == 0 for v in widths.values()):
        return a
    return jnp.pad(a, [(0, widths.get(ax, 0)) for ax in range(a.ndim)], constant_values=value)


@functools.lru_cache(maxsize=None)
def _scan_op(L, Np, chunk, cpp_fwd, cpp_bwd, be_fwd, be_bwd, dt_softplus, interpret, tune: SelectiveScanTuning):
    cfg = dict(T=chunk, L=L, dt_softplus=dt_softplus, interpret=interpret)
    launch_fwd, launch_bwd = tune.launch("fwd", Np), tune.launch("bwd", Np)
    part_launch = {k: v for k, v in launch_bwd.items() if k != "sub_blocks"}

    def run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, save):
        sloc = dprod = None
        if x.shape[1] // (chunk * cpp_fwd) > 1:   # parts: their summaries first, then every part at once
            sloc, dprod = K.scan_part_fwd(x, dt, B, A, bias, keep, BE=be_fwd, cpp=cpp_fwd, **cfg, **launch_fwd)
        return K.scan_fwd(x, dt, B, C, A, D, bias, h0, z, keep, sloc, dprod, BE=be_fwd, cpp=cpp_fwd, save=save,
                          **cfg, **launch_fwd)

    @jax.custom_vjp
    def f(x, dt, B, C, A, D, bias, h0, z, keep):
        y, fin = run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, False)
        return y, fin

    def fwd(x, dt, B, C, A, D, bias, h0, z, keep):
        y, fin, hs, *yp = run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, True)
        return (y, fin), (x, dt, B, C, A, D, bias, z, keep, hs, yp[0] if yp else None)

    def bwd(res, cts):
        x, dt, B, C, A, D, bias, z, keep, hs, yp = res
        dy, dfin = cts
        dz = None
        if z is not None:   # y = y' silu(z): the gate's gradient and dy' = dy silu(z), elementwise (XLA fuses)
            dyf, zf = dy.astype(_F32), z.astype(_F32)
            sz = jax.nn.sigmoid(zf)
            dz = (dyf * yp.astype(_F32) * sz * (1.0 + zf * (1.0 - sz))).astype(z.dtype)
            dy = dyf * zf * sz
        dy = dy.astype(x.dtype)
        qloc = dprod = None
        if x.shape[1] // (chunk * cpp_bwd) > 1:
            qloc, dprod = K.scan_part_bwd(dt, C, A, bias, dy, keep, BE=be_bwd, cpp=cpp_bwd, **cfg, **part_launch)
        dx, ddt, dBp, dCp, dA, dD, dbias, dh0 = K.scan_bwd(
            x, dt, B, C, A, D, bias, hs, dy, dfin.astype(_F32), keep, qloc, dprod, BE=be_bwd, cpp=cpp_bwd, **cfg,
            **launch_bwd)
        dkeep = None if keep is None else jnp.zeros_like(keep)
        return (dx, ddt, dBp.sum(axis=1).astype(B.dtype), dCp.sum(axis=1).astype(C.dtype), dA.sum(axis=(0, 1)),
                dD.sum(axis=(0, 1)), dbias.sum(axis=(0, 1)), dh0, dz, dkeep)

    f.defvjp(fwd, bwd)
    return f


def selective_scan_pallas(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, segment_ids=None,
                          initial_state=None, interpret=False):
    """Selective scan with the Pallas kernels. Same contract as ``reference.selective_scan_ref``; returns
    (y [b, L, E] in x.dtype, final state [b, E, N] f32). Chunk, blocks, warps and stages: ``tuning.current()``.
    ``interpret=True`` only for CPU tests. Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_state."""
    check_shapes(x, dt, A, B, C, D, z, dt_bias, segment_ids, initial_state)
    tune = current()
    b, L, E = x.shape
    N = A.shape[1]
    Np = _next_pow2(N)
    T = int(tune.chunk_for(Np))
    if T < 1 or T & (T - 1):
        raise ValueError(f"tuning chunk must be a power of two, got {T}")
    be_f, be_b = tune.block_e("fwd", Np, E), tune.block_e("bwd", Np, E)
    sub = int(tune.sub_blocks_for(Np))
    for be in (be_f, be_b, sub, tune.lanes_for(Np)):
        if be < 1 or be & (be - 1):
            raise ValueError(f"tuning channel blocks, sub-blocks and lanes must be powers of two, got {be}")
    nc = -(-L // T)
    parts_f = int(tune.parts("fwd", nc, b * (-(-E // be_f)), Np))
    parts_b = int(tune.parts("bwd", nc, b * (-(-E // (be_b * sub))), Np))
    nc = -(-nc // max(parts_f, parts_b)) * max(parts_f, parts_b)            # whole parts (powers of two)
    Lp = nc * T
    eb = max(be_f, be_b * sub)
    Ep = -(-E // eb) * eb
    pl_, pe, pn = Lp - L, Ep - E, Np - N

    xk = _pad(x, {1: pl_, 2: pe})
    dtk = _pad(dt, {1: pl_, 2: pe})
    zk = None if z is None else _pad(z, {1: pl_, 2: pe})
    Bk = _pad(B, {1: pl_, 2: pn})                                           # [b, Lp, Np]
    Ck = _pad(C, {1: pl_, 2: pn})
    Ak = _pad(A.astype(_F32), {0: pe, 1: pn})                                # [Ep, Np]
    Dk = _pad((jnp.zeros((E,), _F32) if D is None else D.astype(_F32)), {0: pe})[None]
    bk = _pad((jnp.zeros((E,), _F32) if dt_bias is None else dt_bias.astype(_F32)), {0: pe})[None]
    h0 = jnp.zeros((b, E, N), _F32) if initial_state is None else initial_state.astype(_F32)
    h0 = _pad(h0, {1: pe, 2: pn})                                            # [b, Ep, Np]
    keep = None
    if segment_ids is not None:
        keep = _pad(segment_keep(segment_ids), {1: pl_}, value=1.0)          # [b, Lp]

    # the state axis split n = n1 N2 + n2 (N2 on lanes): B, C [b, Lp, N1, N2]; A [N1, Ep, N2]; states [b, N1, Ep, N2]
    N2 = int(tune.lanes_for(Np))
    N1 = Np // N2
    Bk, Ck = Bk.reshape(b, Lp, N1, N2), Ck.reshape(b, Lp, N1, N2)
    Ak = Ak.reshape(Ep, N1, N2).transpose(1, 0, 2)
    h0 = h0.reshape(b, Ep, N1, N2).transpose(0, 2, 1, 3)
    y, fin = _scan_op(L, Np, T, nc // parts_f, nc // parts_b, be_f, be_b, bool(dt_softplus), bool(interpret),
                      tune)(
        xk, dtk, Bk, Ck, Ak, Dk, bk, h0, zk, keep)
    fin = fin.transpose(0, 2, 1, 3).reshape(b, Ep, Np)
    return y[:, :L, :E], fin[:, :E, :N]
