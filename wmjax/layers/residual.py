"""Learned per-channel residual scale (the `Residual` modules of Cheems / WonderfulMatrices):

    out = weight * residual + h          weight [dim], init 1 (the skip path is scaled, the branch output is not)

Param `weight` [dim] (upstream key `<name>.weight`), logical axes ("norm",). The product is
`wmjax.layers.norm.scale_by_weight` (weight gradient summed in f32), as Doge's bare residual parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wmjax.layers.norm import scale_by_weight

__all__ = ["Residual"]


class Residual(nn.Module):
    """(residual [..., dim], h [..., dim]) -> weight * residual + h."""

    dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, residual, h):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (self.dim,),
                            self.param_dtype)
        return scale_by_weight(weight, residual, self.dtype) + h
