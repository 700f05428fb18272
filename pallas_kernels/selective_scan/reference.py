"""Mamba-1 selective scan (OTCE's SSM mixer) in plain jnp: the definition (``selective_scan_ref``, a ``lax.scan``
over L in float32) and the single decode step (``selective_scan_step``).

Shapes (``b`` batch, ``L`` tokens, ``E`` channels, ``N`` state size):

    x, dt        [b, L, E]   inputs and raw step sizes
    A            [E, N]      f32 decay rates, already negative (-exp(A_log)); any sign is computed exactly
    B, C         [b, L, N]   input / output projections, one group shared by all channels
    D            [E]         optional skip
    z            [b, L, E]   optional gate
    dt_bias      [E]         optional step-size bias
    segment_ids  [b, L]      optional int document ids of packed sequences
    initial_state [b, E, N]  optional f32 state before the first token

The recurrence (per batch row and channel e, state h [E, N]):

    delta_t  = softplus(dt_t + dt_bias)            (dt_t + dt_bias if dt_softplus is False)
    h_t      = exp(delta_t[e] A[e, n]) h_{t-1}[e, n] + delta_t[e] B_t[n] x_t[e]      (h_{-1} = initial_state)
    y_t[e]   = sum_n h_t[e, n] C_t[n] + D[e] x_t[e];   y_t *= silu(z_t) if z is given

With ``segment_ids`` the state is reset to zero at every token whose id differs from the previous token's (a
document start), so each document behaves as if alone and ``initial_state`` reaches only the first one. Everything
is computed in float32; y is returned in x.dtype, the final state h_{L-1} in float32. softplus is Mamba's
(identity above 20).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["selective_scan_ref", "selective_scan_step", "softplus", "segment_keep", "check_shapes"]

_F32 = jnp.float32


def softplus(v):
    """log(1 + exp(v)), and v itself above 20 (Mamba's threshold); f32 in, f32 out."""
    return jnp.where(v > 20.0, v, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))))


def check_shapes(x, dt, A, B, C, D, z, dt_bias, segment_ids, initial_state):
    """Raises ValueError naming the first argument whose shape does not fit x [b, L, E] (module docstring)."""
    if x.ndim != 3:
        raise ValueError(f"x must be [b, L, E], got {x.shape}")
    b, L, E = x.shape
    if dt.shape != x.shape:
        raise ValueError(f"dt must be {x.shape}, got {dt.shape}")
    if A.ndim != 2 or A.shape[0] != E:
        raise ValueError(f"A must be [E={E}, N], got {A.shape}")
    N = A.shape[1]
    if B.shape != (b, L, N) or C.shape != (b, L, N):
        raise ValueError(f"B, C must be {(b, L, N)}, got {B.shape}, {C.shape}")
    if D is not None and D.shape != (E,):
        raise ValueError(f"D must be {(E,)}, got {D.shape}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must be {x.shape}, got {z.shape}")
    if dt_bias is not None and dt_bias.shape != (E,):
        raise ValueError(f"dt_bias must be {(E,)}, got {dt_bias.shape}")
    if segment_ids is not None and segment_ids.shape != (b, L):
        raise ValueError(f"segment_ids must be {(b, L)}, got {segment_ids.shape}")
    if initial_state is not None and initial_state.shape != (b, E, N):
        raise ValueError(f"initial_state must be {(b, E, N)}, got {initial_state.shape}")


def segment_keep(segment_ids, dtype=_F32):
    """[b, L] ids -> [b, L] keep factor: 0 where the state resets (id differs from the previous token's), else 1
    (always 1 at t = 0, so the initial state reaches the first document)."""
    seg = segment_ids
    same = seg[:, 1:] == seg[:, :-1]
    return jnp.concatenate([jnp.ones_like(seg[:, :1], dtype), same.astype(dtype)], axis=1)


def _delta(dt, dt_bias, dt_softplus):
    v = dt.astype(_F32)
    if dt_bias is not None:
        v = v + dt_bias.astype(_F32)
    return softplus(v) if dt_softplus else v


def _finish(y, x, D, z):
    """y (f32) [..., E] -> (y + D x) * silu(z), f32."""
    if D is not None:
        y = y + D.astype(_F32) * x.astype(_F32)
    if z is not None:
        zf = z.astype(_F32)
        y = y * (zf * jax.nn.sigmoid(zf))
    return y


def selective_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, segment_ids=None,
                       initial_state=None, return_final_state=False):
    """The definition: a token-by-token ``lax.scan`` over L in float32. Returns y [b, L, E] (x.dtype), and with
    return_final_state also the final state [b, E, N] f32."""
    check_shapes(x, dt, A, B, C, D, z, dt_bias, segment_ids, initial_state)
    b, L, E = x.shape
    N = A.shape[1]
    delta = _delta(dt, dt_bias, dt_softplus)                             # [b, L, E]
    xf, Af = x.astype(_F32), A.astype(_F32)
    h0 = jnp.zeros((b, E, N), _F32) if initial_state is None else initial_state.astype(_F32)
    keep = jnp.ones((b, L), _F32) if segment_ids is None else segment_keep(segment_ids)

    def step(h, inp):
        d_t, x_t, B_t, C_t, k_t = inp                                    # [b,E], [b,E], [b,N], [b,N], [b]
        dA = jnp.exp(d_t[:, :, None] * Af[None]) * k_t[:, None, None]
        h = dA * h + (d_t * x_t)[:, :, None] * B_t[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, C_t, precision="highest")

    xs = (delta.swapaxes(0, 1), xf.swapaxes(0, 1), B.astype(_F32).swapaxes(0, 1), C.astype(_F32).swapaxes(0, 1),
          keep.swapaxes(0, 1))
    h, ys = jax.lax.scan(step, h0, xs)
    y = _finish(ys.swapaxes(0, 1), x, D, z).astype(x.dtype)
    return (y, h) if return_final_state else y


def selective_scan_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One decode step. state [b, E, N], x, dt [b, E], A [E, N], B, C [b, N], D [E], z [b, E], dt_bias [E].
    Returns (y [b, E] in x.dtype, new state in state.dtype), computed in float32 with the recurrence above."""
    delta = _delta(dt, dt_bias, dt_softplus)
    h = state.astype(_F32)
    h = jnp.exp(delta[:, :, None] * A.astype(_F32)[None]) * h + \
        (delta * x.astype(_F32))[:, :, None] * B.astype(_F32)[:, None, :]
    y = jnp.einsum("ben,bn->be", h, C.astype(_F32), precision="highest")
    return _finish(y, x, D, z).astype(x.dtype), h.astype(state.dtype)
