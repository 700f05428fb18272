"""Selective SSM (Mamba-1) mixer of OTCE (upstream `CheemsMambaMixer`; /work/shared/research/ssd_cheems_otce.md
§2.4; docs/OTCE.md). E = mamba_expand * d inner channels, N = mamba_d_state, R = dt_rank, K = mamba_d_conv.

    [x | z]   = in_proj(u)                                         [b, L, 2E]
    x         = silu(causal_depthwise_conv_K(x) + conv_bias)        [b, L, E]
    [dt|B|C]  = x_proj(x)                                          [b, L, R + 2N]
    dt, B, C  = RMSNorm_R(dt), RMSNorm_N(B), RMSNorm_N(C)           (each norm with a bias)
    B, C      = RoPE(B), RoPE(C)          (mamba_rope; dim N, base rope_theta, absolute positions)
    C        *= max(1, ln(65 + position) / ln(4096))               (logn; 1 below position 4031)
    delta     = softplus(dt_proj(dt))                              [b, L, E] f32
    A         = -exp(A_log)                                        [E, N] (A_log init log(1..N) per row)
    h_t[e,n]  = exp(delta[e] A[e,n]) h_{t-1}[e,n] + delta[e] B_t[n] x_t[e]
    y_t[e]    = (sum_n h_t[e,n] C_t[n] + D[e] x_t[e]) * silu(z_t[e])     (scan: wmjax.ops.selective_scan)
    out       = out_proj(y)                                        [b, L, d]

Padding: tokens with token_mask 0 get x = 0 (before and after the conv) and delta = 0, so they leave the SSM
state exactly unchanged (exp(0) = 1, delta * B * x = 0) and enter the conv as zeros; the conv cache keeps the last
K - 1 *real* inputs. Packed documents (segment_ids): a conv tap never reads another document, and the scan resets
its state at document starts.

Cache (`wmjax.cache.SSMCache`): ssm_state [b, E, 1, N] f32 (one "head" of size 1 per channel), conv_state
[b, K - 1, E] (the last K - 1 conv inputs, oldest first). Decoding (s = 1 with a cache) uses
`selective_scan_step`; a prefill (or any s > 1) continues from the cached state.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.cache import SSMCache
from wmjax.configs.otce import OTCEConfig
from wmjax.layers.linear import dense
from wmjax.layers.logn import logn_scale
from wmjax.layers.norm import RMSNorm
from wmjax.layers.rope import apply_rope
from wmjax.ops.selective_scan import selective_scan, selective_scan_step

__all__ = ["SelectiveMixer", "causal_depthwise_conv", "last_real_inputs"]


def causal_depthwise_conv(x, kernel, prev=None, segment_ids=None):
    """x [b, s, E]; kernel [K, 1, E] (torch Conv1d(E, E, K, groups=E) weight [E, 1, K], transposed); prev
    [b, K - 1, E] (the inputs before this call; zeros if None) ->  out [b, s, E] (f32 accumulation, x's dtype):

        out[t] = sum_k kernel[k] * x[t - (K - 1) + k]       (x at negative t from prev)

    With segment_ids [b, s], a tap reading a token of another document reads 0 (taps into prev count as the
    first token's document)."""
    b, s, e = x.shape
    k = kernel.shape[0]
    if prev is None:
        prev = jnp.zeros((b, k - 1, e), x.dtype)
    ext = jnp.concatenate([prev.astype(x.dtype), x], axis=1)                      # [b, K - 1 + s, E]
    w = kernel[:, 0, :].astype(jnp.float32)
    if segment_ids is not None:
        seg_ext = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k - 1, axis=1), segment_ids], axis=1)
    out = jnp.zeros((b, s, e), jnp.float32)
    for j in range(k):
        tap = ext[:, j:j + s].astype(jnp.float32)
        if segment_ids is not None:
            tap = jnp.where((seg_ext[:, j:j + s] == segment_ids)[..., None], tap, 0.0)
        out = out + tap * w[j]
    return out.astype(x.dtype)


def last_real_inputs(prev, x, token_mask):
    """The new conv cache: the last K - 1 real inputs of [prev | x] (oldest first). prev [b, K - 1, E] (all real),
    x [b, s, E], token_mask [b, s] bool -> [b, K - 1, E]. Padding anywhere in x is skipped."""
    km1 = prev.shape[1]
    ext = jnp.concatenate([prev, x.astype(prev.dtype)], axis=1)                   # [b, K - 1 + s, E]
    valid = jnp.concatenate([jnp.ones(prev.shape[:2], bool), token_mask.astype(bool)], axis=1)
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)                           # [b, K - 1 + s]
    total = count[:, -1:]
    slot = count - (total - km1) - 1                                              # 0..K-2 for the last K-1 real
    sel = valid[:, None, :] & (slot[:, None, :] == jnp.arange(km1)[None, :, None])  # [b, K - 1, K - 1 + s]
    return jnp.einsum("brt,bte->bre", sel.astype(ext.dtype), ext,
                      precision=jax.lax.Precision.HIGHEST).astype(prev.dtype)


class _ConvParams(nn.Module):
    """The params of torch's depthwise `conv1d` (kernel [K, 1, E], as flax `nn.Conv` with
    feature_group_count=E; optional bias [E]), unapplied."""

    channels: int
    width: int
    use_bias: bool
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                   ("mamba_conv", None, "mamba_inner")),
                            (self.width, 1, self.channels), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mamba_inner",)),
                              (self.channels,), self.param_dtype)
        return kernel, bias


def _a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_log[e, n] = log(n + 1)."""
    e, n = shape
    return jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32)), (e, n)).astype(dtype)


class SelectiveMixer(nn.Module):
    """u [b, s, d] -> (out [b, s, d], new SSMCache or None). Params named like upstream `CheemsMambaMixer`:
    in_proj, conv1d, x_proj, dt_layernorm, B_layernorm, C_layernorm, dt_proj, A_log [E, N], D [E], out_proj."""

    config: OTCEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_impl: Optional[str] = None  # passed to wmjax.ops.selective_scan (None: its default)

    @nn.compact
    def __call__(self, u, rope_cos, rope_sin, positions, token_mask, segment_ids=None, layer_cache=None):
        """u [b, s, d]; rope_cos/sin [b, s, N] (RoPE of B and C; unused without mamba_rope); positions [b, s];
        token_mask [b, s] bool; segment_ids [b, s] or None; layer_cache SSMCache or None."""
        cfg = self.config
        b, s, _ = u.shape
        e, n, r, k = cfg.mamba_inner_size, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv
        mk = lambda feats, axes, name, bias: dense(feats, axes, use_bias=bias, init_std=cfg.initializer_range,
                                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        mask = token_mask.astype(bool)[..., None]

        xz = mk(2 * e, ("embed", "mamba_inner"), "in_proj", cfg.mamba_proj_bias)(u)
        x, z = xz[..., :e], xz[..., e:]
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))

        kernel, conv_bias = _ConvParams(e, k, cfg.mamba_conv_bias, cfg.initializer_range, self.param_dtype,
                                        name="conv1d")()
        prev = None if layer_cache is None else layer_cache.conv_state
        xc = causal_depthwise_conv(x, kernel, prev, segment_ids)
        if conv_bias is not None:
            xc = xc + conv_bias.astype(xc.dtype)
        xc = jnp.where(mask, jax.nn.silu(xc), jnp.zeros((), xc.dtype))

        proj = mk(r + 2 * n, ("mamba_inner", "mamba_rank"), "x_proj", False)(xc)
        dt, B, C = proj[..., :r], proj[..., r:r + n], proj[..., r + n:]
        norm = lambda dim, axis, name: RMSNorm(dim, cfg.rms_norm_eps, (axis,), self.dtype, self.param_dtype,
                                               use_bias=True, name=name)
        dt = norm(r, "mamba_rank", "dt_layernorm")(dt)
        B = norm(n, "mamba_state", "B_layernorm")(B)
        C = norm(n, "mamba_state", "C_layernorm")(C)
        if cfg.mamba_rope:
            B = apply_rope(B[:, :, None], rope_cos, rope_sin)[:, :, 0]
            C = apply_rope(C[:, :, None], rope_cos, rope_sin)[:, :, 0]
        C = (C.astype(jnp.float32) * logn_scale(positions)[..., None]).astype(C.dtype)
        dt = mk(e, ("mamba_rank", "mamba_inner"), "dt_proj", cfg.mamba_proj_bias)(dt)
        delta = jnp.where(mask, jax.nn.softplus(dt.astype(jnp.float32)), 0.0)

        a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("mamba_inner", "mamba_state")),
                           (e, n), self.param_dtype)
        d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("mamba_inner",)), (e,),
                            self.param_dtype)
        A = -jnp.exp(a_log.astype(jnp.float32))
        D = d_skip.astype(jnp.float32)
        impl = {} if self.scan_impl is None else {"impl": self.scan_impl}

        new_cache = None
        if layer_cache is None:
            y = selective_scan(xc, delta, A, B, C, D=D, z=z, dt_softplus=False, segment_ids=segment_ids, **impl)
        else:
            state = layer_cache.ssm_state.reshape(b, e, n)
            if s == 1 and segment_ids is None:
                y, state = selective_scan_step(state, xc[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D=D, z=z[:, 0],
                                               dt_softplus=False)
                y = y[:, None]
            else:
                y, state = selective_scan(xc, delta, A, B, C, D=D, z=z, dt_softplus=False,
                                          segment_ids=segment_ids, initial_state=state, return_final_state=True,
                                          **impl)
            conv_state = last_real_inputs(layer_cache.conv_state, x, token_mask)
            new_cache = SSMCache(ssm_state=state.astype(jnp.float32).reshape(layer_cache.ssm_state.shape),
                                 conv_state=conv_state)
        y = y.astype(self.dtype)
        return mk(cfg.hidden_size, ("mamba_inner", "embed"), "out_proj", cfg.mamba_proj_bias)(y), new_cache
