"""RMSNorm (Zhang & Sennrich 2019): y = w * x / sqrt(mean(x^2) + eps).

Matches HF `DogeRMSNorm`: statistics in f32, cast back to the input dtype, then multiply by the weight.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


def rms_norm(x, weight, eps: float, dtype):
    """x [..., dim] -> [..., dim]: statistics in f32, cast back to x.dtype, times weight (cast to `dtype`)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight.astype(dtype) * x32.astype(x.dtype)


class RMSNorm(nn.Module):
    """x [..., dim] -> [..., dim]; param `weight` [dim] (init 1) with logical axes `axes`."""

    dim: int
    eps: float = 1e-6
    axes: Sequence[str] = ("norm",)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, tuple(self.axes)),
                            (self.dim,), self.param_dtype)
        return rms_norm(x, weight, self.eps, self.dtype)
