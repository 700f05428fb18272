"""Dense projections with logical axis names, named like the HF modules (params: `kernel` [in, out], `bias`).

`dense` is one `nn.Dense`. `fused_dense` declares several such param sets (same names, shapes, init) and applies
them to the same input as ONE matmul over the concatenated kernels:

    [y_1 | y_2 | ...] = x @ [W_1 | W_2 | ...]      (+ b_i on each slice)

Forward: the input is read once by one gemm. Backward: dx = [dy_1 | dy_2 | ...] @ [W_1 | ...]^T is one gemm
(instead of one gemm per projection and elementwise adds of their [.., in] outputs, which XLA otherwise fuses
into, and re-reads from, every consumer of dx), and dW = x^T [dy_1 | ...] one gemm. Same products per output
element as separate `nn.Dense`s (only the gemm's choice of accumulation order may differ).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def _kernel_init(init_std: float, axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes))


def _bias_init(axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],))


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
        kernel_init=_kernel_init(init_std, axes),
        bias_init=_bias_init(axes),
        name=name,
    )


class DenseParams(nn.Module):
    """The params of `dense(features, axes, ...)` (kernel [in_features, features], optional bias [features]),
    declared with the same names, logical axes and initialisers; returns (kernel, bias or None) unapplied."""

    in_features: int
    features: int
    axes: Tuple[str, ...]
    use_bias: bool
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", _kernel_init(self.init_std, self.axes), (self.in_features, self.features),
                            self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", _bias_init(self.axes), (self.features,), self.param_dtype)
        return kernel, bias


def _mesh_sharded(logical_axis: str) -> bool:
    """True when the active logical-axis rules map `logical_axis` to a mesh axis of size > 1."""
    spec = nn.logical_to_mesh_axes((logical_axis,))[0]
    if spec is None:
        return False
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    sizes = dict(jax.sharding.get_abstract_mesh().shape)
    return any(sizes.get(n, 1) > 1 for n in names)


def fused_dense(x, specs: Sequence[Tuple[int, Sequence[str], str]], *, use_bias: bool, init_std: float, dtype: Any,
                param_dtype: Any):
    """x [..., in] -> tuple of y_i [..., features_i], one per spec (features_i, axes_i, name_i).

    Call inside a compact method: declares one `DenseParams` per spec (the param tree of `dense(...)` named
    `name_i`). Computes x @ concat(W_i) in `dtype` and splits the result; where a spec's output axis is sharded
    over a mesh axis (tensor parallelism) it falls back to one matmul per spec, so no sharded kernel is
    concatenated.
    """
    params = [DenseParams(x.shape[-1], f, tuple(axes), use_bias, init_std, param_dtype, name=name)()
              for f, axes, name in specs]
    x = x.astype(dtype)
    kernels = [k.astype(dtype) for k, _ in params]
    matmul = lambda w: jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    if len(specs) > 1 and not any(_mesh_sharded(axes[-1]) for _, axes, _ in specs):
        y = matmul(jnp.concatenate(kernels, axis=1))
        splits = [sum(f for f, _, _ in specs[:i + 1]) for i in range(len(specs) - 1)]
        ys = jnp.split(y, splits, axis=-1)
    else:
        ys = [matmul(w) for w in kernels]
    out = []
    for y, (_, bias) in zip(ys, params):
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        out.append(y)
    return tuple(out)
