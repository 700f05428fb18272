"""The public op ``ssd_pallas``: jnp glue + custom_vjp wiring around ``kernels.py``.

Forward:  pad -> chunk-local cumsum cs of dt*A (jnp) -> S = chunk_states(x, B, w) (kernel)
          -> H = state_passing(S, E, h0) across chunks (kernel)
          -> y' = chunk_scan(x, B, C, dt, cs, e, H) (kernel) -> y = (y' + D x) * silu(z) (jnp, fused by XLA).
Backward: JAX differentiates the glue; the three kernels carry ``jax.custom_vjp`` rules whose backward passes are
Pallas kernels. That gives dx, ddt, dA, dB, dC, dD, dz and d initial_state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import kernels as K
from pallas_kernels.ssd.reference import check_shapes, finish, segment_reset_counts
from pallas_kernels.ssd.tuning import SsdTuning, current

_F32 = jnp.float32


def _next_pow2(v, lo=16):
    r = lo
    while r < v:
        r *= 2
    return r


def _reduce_groups(d_blocks, g):
    """[b, Lp, nb, N] (partial sums per block of heads) -> [b, Lp, g, N] (sum over the blocks of each group)."""
    b, Lp, nb, N = d_blocks.shape
    if g == nb:
        return d_blocks
    return d_blocks.reshape(b, Lp, g, nb // g, N).sum(axis=3)


def _heads_per_program(hg, cap):
    """Largest power of two dividing hg, at most cap: the backward kernels loop over that many heads of one
    group and sum their dB/dC contributions in registers (instead of writing per-head f32 dB/dC)."""
    hs = 1
    while hs * 2 <= cap and hg % (hs * 2) == 0:
        hs *= 2
    return hs


@functools.lru_cache(maxsize=None)
def _chunk_states_op(hg, Q, T, interpret, tune: SsdTuning):
    cfg = dict(hg=hg, Q=Q, T=T, interpret=interpret)

    @jax.custom_vjp
    def f(x, B, w):
        return K.chunk_states_fwd(x, B, w, **cfg, **tune.launch("states_fwd", x.shape[3], B.shape[3]))

    def fwd(x, B, w):
        return f(x, B, w), (x, B, w)

    def bwd(res, dS):
        x, B, w = res
        hs = _heads_per_program(hg, tune.bwd_heads)
        dx, dB, dw = K.chunk_states_bwd(x, B, w, dS, **cfg, hs=hs,
                                        **tune.launch("states_bwd", x.shape[3], B.shape[3]))
        return dx.astype(x.dtype), _reduce_groups(dB, B.shape[2]).astype(B.dtype), dw

    f.defvjp(fwd, bwd)
    return f


@functools.lru_cache(maxsize=None)
def _chunk_scan_op(hg, Q, T, interpret, tune: SsdTuning):
    cfg = dict(hg=hg, Q=Q, T=T, interpret=interpret)

    @jax.custom_vjp
    def f(x, B, C, dt, cs, e, H, cnt):
        return K.chunk_scan_fwd(x, B, C, dt, cs, e, H, cnt, **cfg, **tune.launch("scan_fwd", x.shape[3], B.shape[3]))

    def fwd(x, B, C, dt, cs, e, H, cnt):
        return f(x, B, C, dt, cs, e, H, cnt), (x, B, C, dt, cs, e, H, cnt)

    def bwd(res, dy):
        x, B, C, dt, cs, e, H, cnt = res
        hs = _heads_per_program(hg, tune.bwd_heads)
        dx, dB, dC, ddt, rowterm, de, dH = K.chunk_scan_bwd(x, B, C, dt, cs, e, H, cnt, dy, **cfg, hs=hs,
                                                            **tune.launch("scan_bwd", x.shape[3], B.shape[3]))
        dcs = rowterm - dt * ddt
        g = B.shape[2]
        dcnt = None if cnt is None else jnp.zeros(cnt.shape, jax.dtypes.float0)
        return (dx.astype(x.dtype), _reduce_groups(dB, g).astype(B.dtype), _reduce_groups(dC, g).astype(C.dtype),
                ddt, dcs, de, dH, dcnt)

    f.defvjp(fwd, bwd)
    return f


@functools.lru_cache(maxsize=None)
def _state_passing_op(interpret):
    @jax.custom_vjp
    def f(S, E, h0):
        b, h, nc, P, N = S.shape
        Hin, fin = K.state_passing_fwd(S.reshape(b, h, nc, P * N), E, h0.reshape(b, h, P * N), interpret=interpret)
        return Hin.reshape(S.shape), fin.reshape(h0.shape)

    def fwd(S, E, h0):
        Hin, fin = f(S, E, h0)
        return (Hin, fin), (E, Hin)

    def bwd(res, cts):
        E, Hin = res
        dHin, dfin = cts
        b, h, nc, P, N = Hin.shape
        dS, dh0, dE = K.state_passing_bwd(E, Hin.reshape(b, h, nc, P * N), dHin.reshape(b, h, nc, P * N),
                                          dfin.reshape(b, h, P * N), interpret=interpret)
        return dS.reshape(Hin.shape), dE.sum(axis=2), dh0.reshape(b, h, P, N)

    f.defvjp(fwd, bwd)
    return f


def _state_passing(S, cs_end, keep, h0, interpret):
    """H_c (state entering chunk c) for c = 0..nc-1 and the final state, where H_0 = h0 and
    H_{c+1} = keep_c exp(cs_end_c) H_c + S_c. S [b, h, nc, P, N], cs_end [b, h, nc], keep [b, nc] bool (no
    document boundary inside chunk c), h0 [b, h, P, N]; the sequential Pallas kernels."""
    E = jnp.exp(cs_end) * keep[:, None, :].astype(_F32)
    return _state_passing_op(interpret)(S, E, h0)


def ssd_pallas(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, initial_state=None, segment_ids=None,
               interpret=False):
    """SSD scan with the Pallas kernels. Same contract as ``reference.ssd_chunked``: returns (y [b, L, h, p] in
    x.dtype, final state [b, h, p, n] f32). chunk_size a power of two >= 16. Tiles, warps and stages:
    ``tuning.current()``. ``interpret=True`` only for CPU tests."""
    check_shapes(x, dt, A, B, C, D, z, initial_state, segment_ids)
    tune = current()
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    Q = int(chunk_size)
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Pallas kernels, got {Q}")
    T = min(tune.block_t, Q)
    if T < 16 or T & (T - 1) or Q % T:
        raise ValueError(f"tuning block_t={tune.block_t} must be a power of two >= 16 dividing chunk_size {Q}")
    nc = -(-L // Q)
    Lp = nc * Q
    Pp, Np = _next_pow2(p), _next_pow2(n)
    dtype = x.dtype

    def pad(a, axis_pads):
        if all(v == 0 for v in axis_pads.values()):
            return a
        widths = [(0, axis_pads.get(ax, 0)) for ax in range(a.ndim)]
        return jnp.pad(a, widths)

    xk = pad(x, {1: Lp - L, 3: Pp - p})
    Bk = pad(B.astype(dtype), {1: Lp - L, 3: Np - n})
    Ck = pad(C.astype(dtype), {1: Lp - L, 3: Np - n})
    dtk = pad(dt.astype(_F32), {1: Lp - L}).transpose(0, 2, 1)         # [b, h, Lp]; dt = 0 on the tail
    if initial_state is None:
        h0 = jnp.zeros((b, h, Pp, Np), _F32)
    else:
        h0 = pad(initial_state.astype(_F32), {2: Pp - p, 3: Np - n})

    if segment_ids is None:
        cnt = None
        cntc = jnp.zeros((b, nc, Q), jnp.int32)
    else:
        cnt = segment_reset_counts(segment_ids)
        if Lp > L:
            cnt = jnp.pad(cnt, ((0, 0), (0, Lp - L)), mode="edge")
        cntc = cnt.reshape(b, nc, Q)
    cnt_end = cntc[:, :, -1]
    cnt_prev = jnp.concatenate([cntc[:, :1, 0], cnt_end[:, :-1]], axis=1)
    m_end = (cntc == cnt_end[:, :, None]).astype(_F32)[:, None]        # [b, 1, nc, Q]
    m_prev = (cntc == cnt_prev[:, :, None]).astype(_F32)[:, None]
    keep = cnt_end == cnt_prev                                         # [b, nc]

    dtc = dtk.reshape(b, h, nc, Q)
    cs = jnp.cumsum(dtc * A.astype(_F32)[None, :, None, None], axis=-1)  # [b, h, nc, Q]
    cs_end = cs[..., -1]
    w = (jnp.exp(cs_end[..., None] - cs) * dtc * m_end).reshape(b, h, Lp)
    e = (jnp.exp(cs) * m_prev).reshape(b, h, Lp)

    S = _chunk_states_op(hg, Q, T, interpret, tune)(xk, Bk, w)
    Hin, final = _state_passing(S, cs_end, keep, h0, interpret)
    y = _chunk_scan_op(hg, Q, T, interpret, tune)(xk, Bk, Ck, dtk, cs.reshape(b, h, Lp), e, Hin, cnt)
    if Lp > L or Pp > p:
        y = y[:, :L, :, :p]
    if D is not None or z is not None:
        y = finish(y.astype(_F32), x, D, z).astype(dtype)
    return y, final[:, :, :p, :n]
