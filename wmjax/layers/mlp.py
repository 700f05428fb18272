"""SwiGLU MLP (HF `DogeMLP`): down(silu(gate(x)) * up(x)). x [b, s, hidden] -> [b, s, hidden].

gate and up are one gemm over [W_gate | W_up] (`wmjax.layers.linear.fused_dense`; params still gate_proj/up_proj).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.config import DogeConfig
from wmjax.layers.linear import dense, fused_dense


class MLP(nn.Module):
    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        mk = lambda n, axes, name: dense(n, axes, use_bias=cfg.mlp_bias, init_std=cfg.initializer_range,
                                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        gate, up = fused_dense(x, [(cfg.intermediate_size, ("embed", "mlp"), "gate_proj"),
                                   (cfg.intermediate_size, ("embed", "mlp"), "up_proj")],
                               use_bias=cfg.mlp_bias, init_std=cfg.initializer_range, dtype=self.dtype,
                               param_dtype=self.param_dtype)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                            ("activation_batch", "activation_length", "activation_mlp"))
        return mk(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden)
