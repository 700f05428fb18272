"""ARC, the attentive recurrent cell of Om (`ARCStacked` of dingo-actual/om; shared/research/om_arc.md §2).

One segment x [b, L, D] and the layer's state M [b, S, D] -> (y [b, L, D], new_state [b, S, D]):

    Z^0 = [M ; x ; M]                       (N = S + L + S rows: leading "read" copy, segment, trailing "write" copy)
    pass p = 0..P-1, per head h (6 matrices per head per pass; the two state copies SHARE q/k/v):
        Q = [Z_s Wq_st ; Z_x Wq ; Z_e Wq_st]  (K, V alike; heads replicate Z^0 in pass 0)
        Q, K <- RoPE(Q, K) at positions 1..N (restarting every segment)
        Z^{p+1} = softmax(s_p Q K^T + C) V   (f32; C causal over the N rows; no norm / residual between passes)
    [if dv_{P-1} != r: per-head dv -> r projections, `proj_out` (segment rows) / `proj_out_state` (state rows)]
    y = proj_out(heads_flat(Z_x)),  new_state = proj_out_state(heads_flat(Z_e)),  the leading rows dropped.

Mask C: plain causal (main). With `end_attends_start=False` (heavyball's intended edit) the trailing state rows do
not see the leading state rows. With `qkv_norm` (heavyball) every row of q, k, v is unit-normalized (the
trailing state's too: heavyball's stacked code forgot those rows) and s_p is a learnable per-head
`scaling_factor` [H] initialised to scaling_factors[p].

RoPE (`rope`): interleaved pairs (2i-2, 2i-1) of the first eff = ceil(dk * rope_pct) features rotated by m theta_i,
m the 1-based row: "om_compat" theta_i = base^(-2i) (the original's, almost the identity), "standard"
theta_i = base^(-2(i-1)/eff), "none".

Cached decoding (`ARC.start_kv`, `decode_row`, `end_state`): a row of a pass depends only on the rows before it,
so one new segment row runs alone against per-pass K/V of the earlier rows; the trailing rows (the next state) run
once the segment is complete.

Params mirror the upstream names: weights of a pass `attn_modules_{p}/proj_{q,k,v}[_state]/weights`
[1, H, in, out] (upstream `StackedLinear`, product x @ W), `init_state` [1, S, D] (the learned initial state; the
model reads it with `initial_state()`), `proj_out` / `proj_out_state` Dense kernels [H r, D].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.decode.reference import apply_rope_pairs
from wmjax.configs.om import OmConfig
from wmjax.layers.linear import dense

__all__ = ["ARC", "ARCPass", "arc_rope_angles", "apply_arc_rope", "arc_mask"]

_F32 = jnp.float32


def arc_rope_angles(positions, dk: int, config: OmConfig):
    """positions [...] (1-based rows) -> [..., eff/2] f32 angles m * theta_i (None for rope="none")."""
    if config.rope == "none":
        return None
    eff = config.rope_features(dk)
    i = jnp.arange(1, eff // 2 + 1, dtype=_F32)
    if config.rope == "om_compat":
        theta = jnp.asarray(config.rope_theta, _F32) ** (-2.0 * i)
    else:
        theta = jnp.asarray(config.rope_theta, _F32) ** (-2.0 * (i - 1.0) / eff)
    return jnp.asarray(positions, _F32)[..., None] * theta


def apply_arc_rope(x, angles):
    """x [..., n, dk] f32, angles [..., n, eff/2] (broadcastable) -> x with its first eff features rotated in
    interleaved pairs."""
    if angles is None:
        return x
    eff = 2 * angles.shape[-1]
    rot = x[..., :eff].reshape(x.shape[:-1] + (eff // 2, 2))
    rot = jnp.swapaxes(rot, -1, -2)                                          # [..., n, 2, eff/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [..., n, 1, eff/2]
    rot = jnp.swapaxes(apply_rope_pairs(rot, cos, sin), -1, -2).reshape(x.shape[:-1] + (eff,))
    return jnp.concatenate([rot, x[..., eff:]], axis=-1)


def arc_mask(n_seg: int, state_len: int, end_attends_start: bool):
    """[N, N] bool, True = may attend: causal over [start (S) | segment (n_seg) | end (S)] rows, minus the
    (end rows x start columns) block when not end_attends_start."""
    n = n_seg + 2 * state_len
    r = jnp.arange(n)
    mask = r[:, None] >= r[None, :]
    if not end_attends_start:
        mask = mask & ~((r[:, None] >= n - state_len) & (r[None, :] < state_len))
    return mask


def _stacked(module, name, heads, d_in, d_out, in_axis, param_dtype):
    """An upstream `StackedLinear` weight [1, H, in, out], N(0, sqrt(1/out))."""
    init = nn.with_logical_partitioning(nn.initializers.normal(math.sqrt(1.0 / d_out)),
                                        (None, "heads", in_axis, "head_dim"))
    return module.param(name, init, (1, heads, d_in, d_out), param_dtype)


class _Stacked(nn.Module):
    """Holds one `StackedLinear` (param `weights` [1, H, in, out]); x [b, H, n, in] or [b, n, in] -> [b, H, n, out]."""

    heads: int
    d_in: int
    d_out: int
    in_axis: Any = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = _stacked(self, "weights", self.heads, self.d_in, self.d_out, self.in_axis, self.param_dtype)[0]
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        if x.ndim == 3:
            return jnp.einsum("bnd,hde->bhne", x, w)
        return jnp.einsum("bhnd,hde->bhne", x, w)


class ARCPass(nn.Module):
    """One project-then-attend pass. z [b, N, D] (pass 0) or [b, H, N, din] -> [b, H, N, dv].

    Pieces for cached decoding: `qkv` (projections of state or segment rows), `attend` (scores, mask, softmax)."""

    config: OmConfig
    p: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg, p = self.config, self.p
        H = cfg.num_attention_heads
        dk, dv = cfg.dims_key[p], cfg.dims_value[p]
        din = cfg.hidden_size if p == 0 else cfg.dims_value[p - 1]
        in_axis = "embed" if p == 0 else None
        mk = lambda d_out: _Stacked(H, din, d_out, in_axis, self.dtype, self.param_dtype)
        self.proj_q, self.proj_k, self.proj_v = mk(dk), mk(dk), mk(dv)
        self.proj_q_state, self.proj_k_state, self.proj_v_state = mk(dk), mk(dk), mk(dv)
        if cfg.qkv_norm:
            self.scaling_factor = self.param("scaling_factor", nn.with_logical_partitioning(
                nn.initializers.constant(cfg.scale(p)), ("heads",)), (H,), self.param_dtype)
        self.drop = nn.Dropout(cfg.attn_logit_dropout)

    def qkv(self, z, state: bool):
        """Rows z [b, n, D] or [b, H, n, din] -> (q, k, v) f32 [b, H, n, .] through the state (shared by both
        state copies) or the segment projections; unit rows with qkv_norm. No RoPE."""
        if state:
            q, k, v = self.proj_q_state(z), self.proj_k_state(z), self.proj_v_state(z)
        else:
            q, k, v = self.proj_q(z), self.proj_k(z), self.proj_v(z)
        q, k, v = q.astype(_F32), k.astype(_F32), v.astype(_F32)
        if self.config.qkv_norm:
            unit = lambda t: t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
            q, k, v = unit(q), unit(k), unit(v)
        return q, k, v

    def rope(self, x, positions):
        """x [b, H, n, dk] f32 at 1-based rows `positions` ([n] or [b, 1, n])."""
        return apply_arc_rope(x, arc_rope_angles(positions, self.config.dims_key[self.p], self.config))

    def attend(self, q, k, v, allowed, deterministic=True):
        """softmax(s_p q k^T masked by `allowed`) v in f32, cast to the compute dtype. q [b, H, nq, dk],
        k/v [b, H, nk, .], allowed broadcastable to [b, H, nq, nk]."""
        cfg = self.config
        scale = (self.scaling_factor.astype(_F32)[None, :, None, None] if cfg.qkv_norm else cfg.scale(self.p))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale
        probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        if cfg.attn_logit_dropout > 0:
            probs = self.drop(probs, deterministic=deterministic)
        return jnp.einsum("bhqk,bhkd->bhqd", probs, v).astype(self.dtype)

    def __call__(self, z, deterministic=True, return_kv=False):
        """The pass over all N rows; with return_kv also (k, v) of the leading state and segment rows
        ([b, H, S + n_seg, .], k after RoPE): what cached decoding attends to."""
        S = self.config.state_len
        n_all = z.shape[-2]
        n_seg = n_all - 2 * S
        if z.ndim == 3:
            z_st = jnp.concatenate([z[:, :S], z[:, n_all - S:]], axis=1)     # both state copies [b, 2S, D]
            z_x = z[:, S:n_all - S]
        else:
            z_st = jnp.concatenate([z[:, :, :S], z[:, :, n_all - S:]], axis=2)
            z_x = z[:, :, S:n_all - S]
        st, x = self.qkv(z_st, True), self.qkv(z_x, False)
        q, k, v = (jnp.concatenate([a[:, :, :S], b, a[:, :, S:]], axis=2) for a, b in zip(st, x))
        pos = jnp.arange(1, n_all + 1)
        q, k = self.rope(q, pos), self.rope(k, pos)
        out = self.attend(q, k, v, arc_mask(n_seg, S, self.config.end_attends_start), deterministic)
        if return_kv:
            return out, (k[:, :, :n_all - S], v[:, :, :n_all - S])
        return out


class _MultiPass(nn.Module):
    """Upstream `StatefulCausalMultiAttention`: the P passes, then the per-head dv -> r projections when
    dv_{P-1} != r. z [b, N, D] -> (segment rows [b, H, L, r], trailing state rows [b, H, S, r])."""

    config: OmConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        H, r, dv = cfg.num_attention_heads, cfg.proj_rank, cfg.dims_value[-1]
        self.attn_modules = [ARCPass(cfg, p, self.dtype, self.param_dtype) for p in range(cfg.num_passes)]
        if dv != r:
            self.proj_out = _Stacked(H, dv, r, None, self.dtype, self.param_dtype)
            self.proj_out_state = _Stacked(H, dv, r, None, self.dtype, self.param_dtype)

    def out_proj(self, z, state: bool):
        cfg = self.config
        if cfg.dims_value[-1] == cfg.proj_rank:
            return z
        return self.proj_out_state(z) if state else self.proj_out(z)

    def __call__(self, z, deterministic=True, return_kv=False):
        S = self.config.state_len
        kv = []
        for mod in self.attn_modules:
            z = mod(z, deterministic, return_kv)
            if return_kv:
                z, pkv = z
                kv.append(pkv)
        n_all = z.shape[2]
        x, end = self.out_proj(z[:, :, S:n_all - S], False), self.out_proj(z[:, :, n_all - S:], True)
        return (x, end, tuple(kv)) if return_kv else (x, end)


def _flat_heads(t):
    """[b, H, n, r] -> [b, n, H r] (head-major, as upstream's `b h s d -> b s (h d)`)."""
    return jnp.swapaxes(t, 1, 2).reshape(t.shape[0], t.shape[2], -1)


class ARC(nn.Module):
    """`ARCStacked`: (x [b, L, D], state [b, S, D]) -> (y [b, L, D] before the residual, new_state [b, S, D],
    raw: the ARCformer normalizes it). `initial_state()` -> the learned init_state [1, S, D].

    Cached decoding (per layer a K/V cache `kv` = one (K [b, H, S + L, dk], V [b, H, S + L, dv]) per pass, any
    float dtype (attention in f32; an f32 cache is exact),
    rows 0..S-1 the leading state, S + i segment row i): `start_kv(state)` fills the state rows at a segment's
    start, `decode_row(x, i, kv)` runs one segment row i ([b] per row) against the cache and writes its K/V,
    `end_state(state, kv)` computes the trailing state rows (the next state) once the segment is complete."""

    config: OmConfig
    layer_num: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        std = 1.0 / math.sqrt(0.4) if self.layer_num == 0 else 1.0      # as upstream: layer 0 divides by sqrt(2/5)
        self.init_state = self.param("init_state", nn.with_logical_partitioning(
            nn.initializers.normal(std), (None, None, "embed")), (1, cfg.state_len, cfg.hidden_size),
            self.param_dtype)
        self.attn = _MultiPass(cfg, self.dtype, self.param_dtype)
        out_std = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
        mk = lambda name: dense(cfg.hidden_size, ("heads", "embed"), use_bias=False, init_std=out_std,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        self.proj_out = mk("proj_out")
        self.proj_out_state = mk("proj_out_state")

    def initial_state(self):
        return self.init_state

    def __call__(self, x, state, deterministic=True, return_kv=False):
        b = x.shape[0]
        state = jnp.broadcast_to(state, (b,) + state.shape[1:]).astype(self.dtype)
        z = jnp.concatenate([state, x.astype(self.dtype), state], axis=1)           # [b, N, D]
        res = self.attn(z, deterministic, return_kv)                                # [b, H, ., r]
        y, m = self.proj_out(_flat_heads(res[0])), self.proj_out_state(_flat_heads(res[1]))
        return (y, m, res[2]) if return_kv else (y, m)

    # ------------------------------------------------------------------------------------------ cached decoding
    def start_kv(self, state, kv):
        """Write the leading state rows' K/V of every pass (they attend only among themselves) into rows 0..S-1."""
        S = self.config.state_len
        z = state.astype(self.dtype)
        allowed = arc_mask(0, S, True)[:S, :S]
        pos = jnp.arange(1, S + 1)
        out = []
        for mod, (K, V) in zip(self.attn.attn_modules, kv):
            q, k, v = mod.qkv(z, True)
            q, k = mod.rope(q, pos), mod.rope(k, pos)
            z = mod.attend(q, k, v, allowed)
            out.append((K.at[:, :, :S].set(k.astype(K.dtype)), V.at[:, :, :S].set(v.astype(V.dtype))))
        return tuple(out)

    def decode_row(self, x, i, kv):
        """x [b, 1, D] the segment row i [b] (0-based) -> (y [b, 1, D], kv with row S + i written). The row sees
        the leading state rows and segment rows 0..i: exactly its row of the full pass."""
        cfg = self.config
        S = cfg.state_len
        n = kv[0][0].shape[2]
        row = S + i                                                                 # [b]
        pos = (row + 1)[:, None, None]                                              # [b, 1, 1] 1-based
        slot = (jnp.arange(n)[None, :] == row[:, None])[:, None, :, None]           # [b, 1, n, 1]
        allowed = (jnp.arange(n)[None, :] <= row[:, None])[:, None, None, :]        # [b, 1, 1, n]
        z = x.astype(self.dtype)
        out = []
        for mod, (K, V) in zip(self.attn.attn_modules, kv):
            q, k, v = mod.qkv(z, False)
            q, k = mod.rope(q, pos), mod.rope(k, pos)
            K, V = jnp.where(slot, k.astype(K.dtype), K), jnp.where(slot, v.astype(V.dtype), V)
            z = mod.attend(q, K.astype(_F32), V.astype(_F32), allowed)
            out.append((K, V))
        return self.proj_out(_flat_heads(self.attn.out_proj(z, False))), tuple(out)

    def end_state(self, state, kv):
        """The raw next state: the trailing state rows over the leading state rows, the whole segment (its K/V in
        `kv`) and themselves."""
        cfg = self.config
        S = cfg.state_len
        n = kv[0][0].shape[2]                                                       # S + L
        full = arc_mask(n - S, S, cfg.end_attends_start)[n:, :]                     # trailing rows [S, n + S]
        pos = jnp.arange(n + 1, n + S + 1)
        z = state.astype(self.dtype)
        for mod, (K, V) in zip(self.attn.attn_modules, kv):
            q, k, v = mod.qkv(z, True)
            q, k = mod.rope(q, pos), mod.rope(k, pos)
            z = mod.attend(q, jnp.concatenate([K.astype(_F32), k], axis=2),
                           jnp.concatenate([V.astype(_F32), v], axis=2), full)
        return self.proj_out_state(_flat_heads(self.attn.out_proj(z, True)))
