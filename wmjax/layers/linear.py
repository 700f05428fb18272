"""Dense projections with logical axis names, named like the HF modules (params: `kernel` [in, out], `bias`).

`dense` is one `nn.Dense`. `fused_dense` declares several such param sets (same names, shapes, init) and applies
them to the same input as ONE matmul over the concatenated kernels:

    [y_1 | y_2 | ...] = x @ [W_1 | W_2 | ...]      (+ b_i on each slice)

Forward: the input is read once by one gemm. Backward (`_concat_matmul`'s custom VJP): dx = sum_i dy_i @ W_i^T
and dW_i = x^T dy_i, one gemm per projection on the cotangents as they come, exactly what autodiff of separate
`nn.Dense`s computes (autodiff of the concatenated gemm would concatenate the cotangents [dy_1 | dy_2 | ...] into
one [tokens, sum features] copy per group, slower on the GPU: docs/benchmarks-history.md, Training). Same products
per output element as separate `nn.Dense`s (only the gemm's choice of accumulation order may differ).
`qkv_dense` is the attention layers' q / k / v projection through it.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _kernel_init(init_std: float, axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes))


def _bias_init(axes: Sequence[str]):
    return nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],))


def dense(features: int, axes: Sequence[str], *, use_bias: bool, init_std: float, dtype: Any, param_dtype: Any,
          name: str, precision: Any = None) -> nn.Dense:
    """`nn.Dense` whose kernel [in, out] carries logical axes `axes` and bias [out] carries `axes[-1]`;
    `precision` the dot's (None: XLA's default for `dtype`).

    HF stores `weight` as [out, in]; conversion transposes.
    """
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_kernel_init(init_std, axes),
        bias_init=_bias_init(axes),
        precision=precision,
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


def _matmul(x, w):
    """x [..., in] @ w [in, out] -> [..., out] (in x's dtype, as nn.Dense)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _concat_matmul(x, kernels):
    """x [..., in], kernels (W_i [in, f_i], ...) -> (x @ W_i, ...) computed as one gemm over concat(W_i)."""
    y = _matmul(x, jnp.concatenate(kernels, axis=1))
    splits = [sum(w.shape[1] for w in kernels[:i + 1]) for i in range(len(kernels) - 1)]
    return tuple(jnp.split(y, splits, axis=-1))


def _concat_matmul_fwd(x, kernels):
    return _concat_matmul(x, kernels), (x, kernels)


def _concat_matmul_bwd(res, dys):
    x, kernels = res
    lead = tuple(range(x.ndim - 1))
    dx = None
    for dy, w in zip(dys, kernels):  # dy_i @ W_i^T, summed in x's dtype as autodiff of separate dots does
        part = lax.dot_general(dy.astype(x.dtype), w, (((dy.ndim - 1,), (1,)), ((), ())))
        dx = part if dx is None else dx + part
    dws = tuple(lax.dot_general(x, dy.astype(x.dtype), ((lead, lead), ((), ()))).astype(w.dtype)
                for dy, w in zip(dys, kernels))                                     # x^T dy_i [in, f_i]
    return dx, dws


_concat_matmul.defvjp(_concat_matmul_fwd, _concat_matmul_bwd)


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
    kernels = tuple(k.astype(dtype) for k, _ in params)
    if len(specs) > 1 and not any(_mesh_sharded(axes[-1]) for _, axes, _ in specs):
        ys = _concat_matmul(x, kernels)
    else:
        ys = [_matmul(x, w) for w in kernels]
    out = []
    for y, (_, bias) in zip(ys, params):
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        out.append(y)
    return tuple(out)


def qkv_dense(x, num_heads: int, num_kv_heads: int, head_dim: int, *, use_bias: bool, init_std: float, dtype: Any,
              param_dtype: Any):
    """x [b, s, in] -> (q [b, s, num_heads, head_dim], k, v [b, s, num_kv_heads, head_dim]): the attention
    projections q_proj (kernel axes ("embed", "q_heads")), k_proj, v_proj (("embed", "kv_heads")) as one
    `fused_dense` gemm. Call inside a compact method."""
    b, s, _ = x.shape
    h, g, d = num_heads, num_kv_heads, head_dim
    q, k, v = fused_dense(x, [(h * d, ("embed", "q_heads"), "q_proj"), (g * d, ("embed", "kv_heads"), "k_proj"),
                              (g * d, ("embed", "kv_heads"), "v_proj")],
                          use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype)
    return q.reshape(b, s, h, d), k.reshape(b, s, g, d), v.reshape(b, s, g, d)
