"""The Cheems SSD mixer (`CheemsStateSpaceDuality`; /work/shared/research/ssd_cheems_otce.md 1.5). Not a Mamba-2
mixer: no in_proj split, conv1d, dt_bias, A_log/D or gate.

    C = c_proj(u), B = b_proj(u), x = x_proj(u)   [b, L, H, P]     (one B/C group per head: G = H, N = P = d/H)
    dt = softplus(dt_proj(u))                     [b, L, H] f32    (0 at padding tokens: pads leave the state alone)
    C, B = RoPE(C), RoPE(B)                       (the attention's cos/sin, positions of the tokens)
    y = SSD(x, dt, A, B, C)                       S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t
    out = out_proj(y.reshape(b, L, H*P))

A per head: `ssd_a="raw"` -> the parameter `A` (init +1, upstream's) as is (the exact recurrence grows);
`ssd_a="negative_exp"` -> A = -exp(A_log) (param `A_log`, init 0, so A = -1), a decaying scan.
The scan is `wmjax.ops.ssd.ssd` (Pallas kernels on GPU, the chunked jnp form elsewhere); one-token decoding is
`ssd_step` on the layer's `wmjax.cache.SSMCache`.

Reusable pieces (also for OTCE-style mixers): `rotate_bc` (RoPE on B/C), `ssd_a_value` (the A parameterisation),
`ssd_scan_cached` (scan or decode step on an optional SSMCache).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.cache import SSMCache
from wmjax.layers.linear import dense, fused_dense
from wmjax.layers.rope import apply_rope
from wmjax.ops.ssd import ssd, ssd_step

__all__ = ["CheemsSSD", "rotate_bc", "ssd_a_value", "ssd_a_param", "ssd_scan_cached"]


def rotate_bc(B, C, cos, sin):
    """RoPE on the SSD's input / output projections: B, C [b, L, G, N]; cos, sin [b, L, N] (rotate_half layout,
    `wmjax.layers.rope`). Because rot_t^T rot_s = rot_{s-t}, C_t . B_s then depends only on t - s."""
    return apply_rope(B, cos, sin), apply_rope(C, cos, sin)


def ssd_a_param(module: nn.Module, heads: int, mode: str, param_dtype) -> jax.Array:
    """Declare the A parameter of `mode` on `module` ("raw": `A` init 1; "negative_exp": `A_log` init 0), logical
    axes ("heads",); returns the parameter."""
    if mode == "raw":
        return module.param("A", nn.with_logical_partitioning(nn.initializers.ones, ("heads",)), (heads,),
                            param_dtype)
    if mode == "negative_exp":
        return module.param("A_log", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)), (heads,),
                            param_dtype)
    raise ValueError(f"ssd_a={mode!r}: expected 'raw' or 'negative_exp'")


def ssd_a_value(param, mode: str) -> jax.Array:
    """The per-head log-decay rate A [H] f32 from its parameter: raw -> param; negative_exp -> -exp(param)."""
    p = param.astype(jnp.float32)
    return p if mode == "raw" else -jnp.exp(p)


def ssd_scan_cached(x, dt, A, B, C, *, chunk_size: int, layer_cache: Optional[SSMCache] = None, segment_ids=None,
                    implementation=None):
    """SSD over s tokens, optionally continuing a layer's `SSMCache`.

    x [b, s, h, p], dt [b, s, h] (softplus'ed; 0 = the token is skipped: no decay, no input), A [h], B, C
    [b, s, g, n]. Without a cache: the scan from a zero state. With a cache: s == 1 (no segment ids) is one
    recurrent step (`ssd_step`); otherwise the scan starts from the cached state. Returns (y [b, s, h, p] in
    x.dtype, new cache or None); the cached state stays f32.
    """
    if layer_cache is None:
        y = ssd(x, dt, A, B, C, chunk_size=chunk_size, segment_ids=segment_ids, implementation=implementation)
        return y, None
    if x.shape[1] == 1 and segment_ids is None:
        y, state = ssd_step(layer_cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
        return y[:, None], layer_cache.replace(ssm_state=state)
    y, state = ssd(x, dt, A, B, C, chunk_size=chunk_size, initial_state=layer_cache.ssm_state,
                   segment_ids=segment_ids, return_final_state=True, implementation=implementation)
    return y, layer_cache.replace(ssm_state=state.astype(layer_cache.ssm_state.dtype))


class CheemsSSD(nn.Module):
    """Params (upstream names): c_proj, b_proj, x_proj [d, H*P], dt_proj [d, H], out_proj [H*P, d] (Dense; bias
    iff hidden_bias), and `A` [H] (ssd_a="raw") or `A_log` [H] (ssd_a="negative_exp")."""

    config: Any  # wmjax.configs.cheems.CheemsConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ssd_impl: Optional[str] = None  # wmjax.ops.ssd.ssd implementation: None (auto) | "pallas" | "chunked" | "naive"

    @nn.compact
    def __call__(self, u, rope_cos, rope_sin, token_mask, segment_ids=None, layer_cache=None):
        """u [b, s, d] (normed hidden); rope_cos/sin [b, s, P]; token_mask [b, s] bool.
        Returns (out [b, s, d], new layer cache or None)."""
        cfg = self.config
        b, s, _ = u.shape
        h, p = cfg.num_attention_heads, cfg.head_dim
        hp = h * p
        c, bb, x, dt = fused_dense(u, [(hp, ("embed", "heads"), "c_proj"), (hp, ("embed", "heads"), "b_proj"),
                                       (hp, ("embed", "heads"), "x_proj"), (h, ("embed", "heads"), "dt_proj")],
                                   use_bias=cfg.hidden_bias, init_std=cfg.initializer_range, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
        C, B = c.reshape(b, s, h, p), bb.reshape(b, s, h, p)
        x = x.reshape(b, s, h, p)
        B, C = rotate_bc(B, C, rope_cos, rope_sin)
        dt = jnp.where(token_mask[..., None], jax.nn.softplus(dt.astype(jnp.float32)), 0.0)
        A = ssd_a_value(ssd_a_param(self, h, cfg.ssd_a, self.param_dtype), cfg.ssd_a)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_heads", None))
        y, layer_cache = ssd_scan_cached(x, dt, A, B, C, chunk_size=cfg.ssd_chunk_size, layer_cache=layer_cache,
                                         segment_ids=segment_ids, implementation=self.ssd_impl)
        out = dense(cfg.hidden_size, ("heads", "embed"), use_bias=cfg.hidden_bias, init_std=cfg.initializer_range,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(y.reshape(b, s, hp))
        return out, layer_cache
