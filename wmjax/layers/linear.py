"""Dense projection with logical axis names, named like the HF module (params: `kernel` [in, out], `bias`)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


def dense(features: int, axes: Sequence[str], *, use_bias: bool, init_std: float, dtype: Any, param_dtype: Any,
          name: str) -> nn.Dense:
    """`nn.Dense` whose kernel [in, out] carries logical axes `axes` and bias [out] carries `axes[-1]`.

    HF stores `weight` as [out, in]; conversion transposes.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )
