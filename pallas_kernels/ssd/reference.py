"""Mamba-2 state-space duality (SSD) scan in plain jnp: the definition (naive recurrence), the chunked form the
kernels compute, and the single decode step.

Shapes (``b`` batch, ``L`` tokens, ``h`` heads, ``p`` head dim, ``g`` B/C groups, ``n`` state size):

    x   [b, L, h, p]     inputs
    dt  [b, L, h]        step sizes, already softplus'ed and biased (>= 0)
    A   [h]              per-head log-decay rate (negative for a stable scan; any sign is computed exactly)
    B   [b, L, g, n]     input projections; head ``i`` reads group ``i // (h // g)``
    C   [b, L, g, n]     output projections
    D   [h]              optional skip
    z   [b, L, h, p]     optional gate
    h0  [b, h, p, n]     optional initial state
    segment_ids [b, L]   optional int document ids of packed sequences

The recurrence (per batch and head, the state ``S`` is ``p x n``):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          (S_{-1} = h0)
    y_t = (S_t C_t + D * x_t) * silu(z_t)                      (the silu gate only if z is given)

With ``segment_ids`` the state is reset to zero at every token whose id differs from the previous token's
(a document boundary), so ``h0`` reaches only each row's first document; the final state is ``S_{L-1}``.
Everything is computed in float32; ``y`` is returned in ``x.dtype`` and the final state in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ssd_naive", "ssd_chunked", "ssd_step", "segment_reset_counts", "check_shapes", "finish"]

_F32 = jnp.float32


def check_shapes(x, dt, A, B, C, D, z, initial_state, segment_ids):
    """Raises ValueError naming the first argument whose shape does not fit x [b, L, h, p] (module docstring)."""
    b, L, h, p = x.shape
    if dt.shape != (b, L, h):
        raise ValueError(f"dt must be {(b, L, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must be {(h,)}, got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, L) or B.shape != C.shape:
        raise ValueError(f"B, C must be [b, L, g, n] with b={b}, L={L}; got {B.shape}, {C.shape}")
    g = B.shape[2]
    if h % g:
        raise ValueError(f"heads {h} must be a multiple of groups {g}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be {(h,)}, got {D.shape}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must be {x.shape}, got {z.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"initial_state must be {(b, h, p, B.shape[3])}, got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, L):
        raise ValueError(f"segment_ids must be {(b, L)}, got {segment_ids.shape}")


def segment_reset_counts(segment_ids: jax.Array) -> jax.Array:
    """[b, L] ids -> [b, L] int32 monotone count of document boundaries up to and including each token.

    Two tokens s <= t belong to one document (no reset in (s, t]) iff their counts are equal.
    """
    seg = segment_ids.astype(jnp.int32)
    boundary = jnp.concatenate(
        [jnp.zeros_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], axis=1)
    return jnp.cumsum(boundary, axis=1, dtype=jnp.int32)


def _expand_groups(M: jax.Array, h: int) -> jax.Array:
    """[b, L, g, n] -> [b, L, h, n] (head i reads group i // (h // g))."""
    return jnp.repeat(M, h // M.shape[2], axis=2)


def finish(y, x, D, z):
    """y (f32, pre-skip) [..., h, p] -> (y + D x) * silu(z), f32."""
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x.astype(_F32)
    if z is not None:
        zf = z.astype(_F32)
        y = y * (zf * jax.nn.sigmoid(zf))
    return y


def _recurrence_step(S, x_t, dt_t, A, B_t, C_t, keep=None):
    """S [b, h, p, n], x_t [b, h, p], dt_t [b, h], A [h], B_t / C_t [b, h, n] (per head), keep [b] (0 = reset),
    all f32 -> (S_t, S_t C_t [b, h, p])."""
    decay = jnp.exp(dt_t * A[None, :])
    if keep is not None:
        decay = decay * keep[:, None]
    S = decay[:, :, None, None] * S + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
    return S, jnp.einsum("bhpn,bhn->bhp", S, C_t, precision="highest")


# ------------------------------------------------------------------------------------------------------------
# Naive sequential recurrence: the definition.
# ------------------------------------------------------------------------------------------------------------
def ssd_naive(x, dt, A, B, C, *, D=None, z=None, initial_state=None, segment_ids=None):
    """Token-by-token recurrence (lax.scan over L), float32. Returns (y [b, L, h, p] in x.dtype, state f32)."""
    check_shapes(x, dt, A, B, C, D, z, initial_state, segment_ids)
    b, L, h, p = x.shape
    n = B.shape[3]
    xf, dtf, Af = x.astype(_F32), dt.astype(_F32), A.astype(_F32)
    Bh, Ch = _expand_groups(B.astype(_F32), h), _expand_groups(C.astype(_F32), h)
    s0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
    if segment_ids is None:
        keep = jnp.ones((b, L), _F32)
    else:
        seg = segment_ids
        keep = jnp.concatenate(
            [jnp.ones((b, 1), _F32), (seg[:, 1:] == seg[:, :-1]).astype(_F32)], axis=1)

    def step(S, inp):
        x_t, dt_t, B_t, C_t, k_t = inp  # [b,h,p], [b,h], [b,h,n], [b,h,n], [b]
        return _recurrence_step(S, x_t, dt_t, Af, B_t, C_t, k_t)

    xs = (xf.swapaxes(0, 1), dtf.swapaxes(0, 1), Bh.swapaxes(0, 1), Ch.swapaxes(0, 1), keep.swapaxes(0, 1))
    S, ys = jax.lax.scan(step, s0, xs)
    y = finish(ys.swapaxes(0, 1), x, D, z)
    return y.astype(x.dtype), S


# ------------------------------------------------------------------------------------------------------------
# Chunked algorithm in plain jnp (intra-chunk quadratic form, chunk states, inter-chunk state passing).
# ------------------------------------------------------------------------------------------------------------
def ssd_chunked(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, initial_state=None, segment_ids=None):
    """Chunked SSD (Mamba-2 "ssd_minimal" algorithm) in float32 jnp. Arbitrary L (tail padded with dt = 0).

    Per chunk c of Q = chunk_size tokens with local cumulative log-decay cs_l = sum_{r<=l} dt_r A:
      1. Y_diag[l] = sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s          (same document only)
      2. S_c       = sum_s exp(cs_{Q-1} - cs_s) dt_s x_s B_s^T                  (tokens of the chunk's last doc)
      3. H_{c+1}   = exp(cs_{Q-1}) H_c + S_c,  H_0 = h0                          (x0 if a boundary is in chunk c)
      4. Y_off[l]  = exp(cs_l) H_c C_l                                          (only before the chunk's 1st reset)
      5. y = Y_diag + Y_off + D x, then * silu(z).
    Returns (y [b, L, h, p] in x.dtype, final state [b, h, p, n] f32).
    """
    check_shapes(x, dt, A, B, C, D, z, initial_state, segment_ids)
    b, L, h, p = x.shape
    n = B.shape[3]
    Q = int(chunk_size)
    nc = -(-L // Q)
    Lp = nc * Q
    pad = Lp - L
    hi = jax.lax.Precision.HIGHEST

    def padL(a, mode="constant"):
        if pad == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, pad)
        return jnp.pad(a, widths, mode=mode)

    xf = padL(x.astype(_F32)).reshape(b, nc, Q, h, p)
    dtf = padL(dt.astype(_F32)).reshape(b, nc, Q, h)
    Bf = _expand_groups(padL(B.astype(_F32)), h).reshape(b, nc, Q, h, n)
    Cf = _expand_groups(padL(C.astype(_F32)), h).reshape(b, nc, Q, h, n)
    if segment_ids is None:
        cnt = jnp.zeros((b, nc, Q), jnp.int32)
    else:
        cnt = padL(segment_reset_counts(segment_ids), mode="edge").reshape(b, nc, Q)
    cnt_end = cnt[:, :, -1]                                            # [b, nc]
    cnt_prev = jnp.concatenate([cnt[:, :1, 0], cnt_end[:, :-1]], axis=1)  # [b, nc]

    a = dtf * A.astype(_F32)                                           # [b, nc, Q, h]
    cs = jnp.cumsum(a, axis=2)
    cs_end = cs[:, :, -1, :]                                           # [b, nc, h]

    # 1. intra-chunk
    t_idx = jnp.arange(Q)
    causal = t_idx[:, None] >= t_idx[None, :]                           # [t, s]
    same = cnt[:, :, :, None] == cnt[:, :, None, :]                    # [b, nc, t, s]
    valid = causal[None, None] & same                                  # [b, nc, t, s]
    diff = cs[:, :, :, None, :] - cs[:, :, None, :, :]                 # [b, nc, t, s, h]
    Lmat = jnp.exp(jnp.where(valid[..., None], diff, -jnp.inf))
    CB = jnp.einsum("bcthn,bcshn->bctsh", Cf, Bf, precision=hi)
    y_diag = jnp.einsum("bctsh,bcsh,bcshp->bcthp", CB * Lmat, dtf, xf, precision=hi)

    # 2. chunk states
    m_end = (cnt == cnt_end[:, :, None]).astype(_F32)                  # [b, nc, Q]
    w = jnp.exp(cs_end[:, :, None, :] - cs) * dtf * m_end[..., None]   # [b, nc, Q, h]
    S = jnp.einsum("bcsh,bcshp,bcshn->bchpn", w, xf, Bf, precision=hi)

    # 3. state passing (sequential over chunks)
    E = jnp.exp(cs_end) * (cnt_end == cnt_prev).astype(_F32)[:, :, None]  # [b, nc, h]
    h0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)

    def pass_step(H, inp):
        S_c, E_c = inp
        return E_c[:, :, None, None] * H + S_c, H

    final, Hin = jax.lax.scan(pass_step, h0, (S.swapaxes(0, 1), E.swapaxes(0, 1)))
    Hin = Hin.swapaxes(0, 1)                                           # [b, nc, h, p, n]

    # 4. inter-chunk output
    m_prev = (cnt == cnt_prev[:, :, None]).astype(_F32)                # [b, nc, Q]
    e = jnp.exp(cs) * m_prev[..., None]                                # [b, nc, Q, h]
    y_off = jnp.einsum("bclh,bclhn,bchpn->bclhp", e, Cf, Hin, precision=hi)

    y = (y_diag + y_off).reshape(b, Lp, h, p)[:, :L]
    y = finish(y, x, D, z)
    return y.astype(x.dtype), final


# ------------------------------------------------------------------------------------------------------------
# Single-step decode update.
# ------------------------------------------------------------------------------------------------------------
def ssd_step(state, x_t, dt_t, A, B_t, C_t, D=None, z_t=None):
    """One recurrent step (decoding).

    state [b, h, p, n], x_t [b, h, p], dt_t [b, h], A [h], B_t, C_t [b, g, n], D [h], z_t [b, h, p].
    Returns (y_t [b, h, p] in x_t.dtype, new state in state.dtype), computed in float32:
        S = exp(dt_t A) S + dt_t x_t B_t^T;  y_t = S C_t + D x_t;  y_t *= silu(z_t).
    """
    h = x_t.shape[1]
    Bh = jnp.repeat(B_t.astype(_F32), h // B_t.shape[1], axis=1)
    Ch = jnp.repeat(C_t.astype(_F32), h // C_t.shape[1], axis=1)
    Sf, y = _recurrence_step(state.astype(_F32), x_t.astype(_F32), dt_t.astype(_F32), A.astype(_F32), Bh, Ch)
    return finish(y, x_t, D, z_t).astype(x_t.dtype), Sf.astype(state.dtype)
