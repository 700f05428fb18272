"""The public op ``selective_scan_pallas``: jnp glue (pad) + a custom_vjp around ``kernels.py``.

Forward:  pad L to whole parts of cpp chunks of T tokens, E to the channel blocks, N to a power of two; split the
          state axis n = n1 N2 + n2 (forward and backward each their own N2: the saved states are channel-major,
          [b, L/T, E, N]); with more than one part ``scan_part_fwd`` (each part's end state from zero and decay
          product), then ``scan_fwd`` (every part at once from the state its summaries fold to: y with D skip and z
          gate fused, final state) -> slice.
Backward: ``scan_fwd(save=True)`` under the VJP keeps the state entering every backward chunk (the backward's chunk
          divides the forward's; with z, also the ungated
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
from pallas_kernels.selective_scan.tuning import current

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


def _split(N2, B, C, A, h0):
    """The state axis split n = n1 N2 + n2 (N2 on lanes): B, C [b, Lp, Np] -> [b, Lp, N1, N2]; A [Ep, Np] ->
    [N1, Ep, N2]; h0 [b, Ep, Np] -> [b, N1, Ep, N2]."""
    b, Lp, Np = B.shape
    Ep, N1 = A.shape[0], Np // N2
    return (B.reshape(b, Lp, N1, N2), C.reshape(b, Lp, N1, N2), A.reshape(Ep, N1, N2).transpose(1, 0, 2),
            h0.reshape(b, Ep, N1, N2).transpose(0, 2, 1, 3))


def _state(v):
    """[b, N1, Ep, N2] -> [b, Ep, Np] (the inverse of `_split`'s h0 layout)."""
    b, N1, Ep, N2 = v.shape
    return v.transpose(0, 2, 1, 3).reshape(b, Ep, N1 * N2)


@functools.lru_cache(maxsize=None)
def _scan_op(L, Np, chunks, fwd_cfg, bwd_cfg, dt_softplus, interpret):
    """chunks: (forward chunk, backward chunk = the saved states' interval); fwd_cfg: (N2, BE, cpp, launch) of the
    forward kernels (with or without saved states); bwd_cfg: the same of the backward's."""
    cfg = dict(L=L, dt_softplus=dt_softplus, interpret=interpret)
    cfg_f, cfg_b = dict(cfg, T=chunks[0]), dict(cfg, T=chunks[1])
    N2f, be_f, cpp_f, launch_f = fwd_cfg
    N2b, be_b, cpp_b, launch_b = bwd_cfg
    launch_f, launch_b = dict(launch_f), dict(launch_b)
    # the backward's part pass holds few registers and waits on its loads: it always loads the next chunk ahead
    part_launch = {**{k: v for k, v in launch_b.items() if k not in ("sub_blocks", "groups", "scatter")},
                   "prefetch": True}

    def run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, save):
        B, C, A, h0 = _split(N2f, B, C, A, h0)
        sloc = dprod = None
        if x.shape[1] // (chunks[0] * cpp_f) > 1:   # parts: their summaries first, then every part at once
            sloc, dprod = K.scan_part_fwd(x, dt, B, A, bias, keep, BE=be_f, cpp=cpp_f, **cfg_f, **launch_f)
        y, fin, *rest = K.scan_fwd(x, dt, B, C, A, D, bias, h0, z, keep, sloc, dprod, BE=be_f, cpp=cpp_f, save=save,
                                   T_save=chunks[1], **cfg_f, **launch_f)
        return (y, _state(fin), *rest)

    @jax.custom_vjp
    def f(x, dt, B, C, A, D, bias, h0, z, keep):
        return run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, False)

    def fwd(x, dt, B, C, A, D, bias, h0, z, keep):
        y, fin, hs, *yp = run_fwd(x, dt, B, C, A, D, bias, h0, z, keep, True)
        b, nc, Ep = hs.shape[:3]
        hs = hs.reshape(b, nc, Ep, Np // N2b, N2b)   # channel-major states: the backward's own split of N
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
        Bs, Cs, As, dfs = _split(N2b, B, C, A, dfin.astype(_F32))
        qloc = dprod = None
        if x.shape[1] // (chunks[1] * cpp_b) > 1:
            qloc, dprod = K.scan_part_bwd(dt, Cs, As, bias, dy, keep, BE=be_b, cpp=cpp_b, **cfg_b, **part_launch)
        dx, ddt, dBp, dCp, dA, dD, dbias, dh0 = K.scan_bwd(
            x, dt, Bs, Cs, As, D, bias, hs, dy, dfs, keep, qloc, dprod, BE=be_b, cpp=cpp_b, **cfg_b, **launch_b)
        dkeep = None if keep is None else jnp.zeros_like(keep)
        dB, dC = (v.sum(axis=1).reshape(B.shape).astype(B.dtype) for v in (dBp, dCp))
        dA = dA.sum(axis=(0, 1)).transpose(1, 0, 2).reshape(A.shape)
        return (dx, ddt, dB, dC, dA, dD.sum(axis=(0, 1)), dbias.sum(axis=(0, 1)), _state(dh0), dz, dkeep)

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
    T, Tb = int(tune.chunk_for(Np)), int(tune.chunk_bwd_for(Np))
    be_f, be_b = tune.block_e("fwd", Np, E), tune.block_e("bwd", Np, E)
    sub, groups = int(tune.sub_blocks_for(Np)), int(tune.groups_for(Np, E))
    N2f, N2b = int(tune.lanes_for("fwd", Np)), int(tune.lanes_for("bwd", Np))
    for name, v in (("chunk", T), ("chunk_bwd", Tb), ("block_e_fwd", be_f), ("block_e_bwd", be_b),
                    ("sub_blocks_bwd", sub), ("groups_bwd", groups), ("lanes_n_fwd", N2f), ("lanes_n_bwd", N2b)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"tuning {name} must be a power of two, got {v}")
    if Tb > T:
        raise ValueError(f"tuning chunk_bwd ({Tb}) must not exceed chunk ({T}): the forward saves the states entering "
                         f"the backward's chunks from inside its own")
    if groups > 1 and tune.warps("bwd", Np) != 1:
        # the groups' carries are read, added to and written back in memory; tiles smaller than the program (dD,
        # d dt_bias [1, BE]) sit on several threads, in lockstep only inside one warp
        raise ValueError(f"tuning groups_bwd > 1 needs one warp per backward program, got num_warps_bwd "
                         f"{tune.warps('bwd', Np)}")
    parts_f = int(tune.parts("fwd", -(-L // T), b * (-(-E // be_f)), Np))
    parts_b = int(tune.parts("bwd", -(-L // Tb), b * (-(-E // (be_b * sub * groups))), Np))
    unit = max(T * parts_f, Tb * parts_b)                                    # powers of two: whole parts both ways
    Lp = -(-L // unit) * unit
    eb = max(be_f, be_b * sub * groups)
    Ep = -(-E // eb) * eb
    pl_, pe, pn = Lp - L, Ep - E, Np - N

    xk = _pad(x, {1: pl_, 2: pe})
    dtk = _pad(dt, {1: pl_, 2: pe})
    zk = None if z is None else _pad(z, {1: pl_, 2: pe})
    Bk = _pad(B.astype(_F32), {1: pl_, 2: pn})                               # [b, Lp, Np] f32: every thread
    Ck = _pad(C.astype(_F32), {1: pl_, 2: pn})                               # unpacks each row otherwise
    Ak = _pad(A.astype(_F32), {0: pe, 1: pn})                                # [Ep, Np]
    Dk = _pad((jnp.zeros((E,), _F32) if D is None else D.astype(_F32)), {0: pe})[None]
    bk = _pad((jnp.zeros((E,), _F32) if dt_bias is None else dt_bias.astype(_F32)), {0: pe})[None]
    h0 = jnp.zeros((b, E, N), _F32) if initial_state is None else initial_state.astype(_F32)
    h0 = _pad(h0, {1: pe, 2: pn})                                            # [b, Ep, Np]
    keep = None
    if segment_ids is not None:
        keep = _pad(segment_keep(segment_ids), {1: pl_}, value=1.0)          # [b, Lp]

    frozen = lambda d: tuple(sorted(d.items()))  # noqa: E731 - hashable launch keywords for the op cache
    fwd_cfg = (N2f, be_f, Lp // (T * parts_f), frozen(tune.launch("fwd", Np)))
    bwd_cfg = (N2b, be_b, Lp // (Tb * parts_b), frozen({**tune.launch("bwd", Np), "groups": groups}))
    y, fin = _scan_op(L, Np, (T, Tb), fwd_cfg, bwd_cfg, bool(dt_softplus), bool(interpret))(
        xk, dtk, Bk, Ck, Ak, Dk, bk, h0, zk, keep)
    return y[:, :L, :E], fin[:, :E, :N]
