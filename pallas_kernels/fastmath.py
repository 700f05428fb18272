"""Elementwise f32 math for Pallas Triton kernels at the cost of the hardware instruction.

Pallas' Triton lowering sends exp2, log2, division, sigmoid and log1p to libdevice's accurate functions: without
flush-to-zero ``__nv_exp2f`` wraps MUFU.EX2 in a range test and two rescaling multiplies, ``log1pf`` is a ~40
instruction polynomial, and ``a * b + c`` stays a multiply and an add (no contraction). In kernels that are bound by
instruction issue (the selective scan: `docs/KERNELS.md`) these ops are the budget. Here:

* ``fma(a, b, c)`` = a b + c as one FFMA (``math.fma``);
* ``exp2``, ``log2``, ``rcp`` = one MUFU op each (``ex2`` / ``lg2`` / ``rcp.approx.ftz.f32``, ~2 ulp; results and
  inputs below 2^-126 flush to 0);
* ``sigmoid(x)`` = rcp(1 + 2^(-x log2 e)) and ``softplus(x)`` = max(x, 0) + log1p(e^-|x|), log1p(w) =
  log(u) w / (u - 1) with u = 1 + w (exact to a few ulp for small w: the rounding of u cancels), from those.

Elsewhere (Pallas interpret mode, plain jit on any backend) each is its exact jnp expression (sigmoid and softplus
too), so CPU tests check the kernels' algebra and the GPU check (``bench/selective_scan.py``) the approximations.
The primitives' Triton rules are registered in Pallas' Triton rule table (``jax._src.pallas.triton.lowering``,
private, the same in jax 0.10.2 and 0.11.2), like ``selective_scan/linear_scan.py``'s scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core

from pallas_kernels.triton_rules import inline_asm, math_dialect, primitive, triton_lowering

__all__ = ["LOG2E", "exp2", "fma", "log2", "rcp", "sigmoid", "softplus"]

LOG2E = 1.4426950408889634   # exp(x) = exp2(x LOG2E)
_LN2 = 0.6931471805599453


def _same_shape(*avals, **params):
    del params
    if len({(a.shape, a.dtype) for a in avals}) != 1:
        raise ValueError(f"fastmath operands must share one shape and dtype, got {[str(a) for a in avals]}")
    return jax_core.ShapedArray(avals[0].shape, avals[0].dtype)


def _primitive(name, impl, triton_rule):
    return primitive(name, impl, triton_rule, abstract_eval=_same_shape)


def _approx_rule(instruction):
    return lambda ctx, x: inline_asm(ctx, f"fastmath {instruction}", f"{instruction}.approx.ftz.f32 $0, $1;", x)


_fma_p = _primitive("wmjax_fma", lambda a, b, c: a * b + c, lambda ctx, a, b, c: math_dialect.fma(a, b, c))
_exp2_p = _primitive("wmjax_ex2_approx", jnp.exp2, _approx_rule("ex2"))
_log2_p = _primitive("wmjax_lg2_approx", jnp.log2, _approx_rule("lg2"))
_rcp_p = _primitive("wmjax_rcp_approx", lambda x: 1.0 / x, _approx_rule("rcp"))


def fma(a, b, c):
    """a b + c (f32 arrays of one shape), fused in a Triton kernel."""
    return _fma_p.bind(a, b, c)


def exp2(x):
    """2^x (f32), one ex2.approx.ftz in a Triton kernel."""
    return _exp2_p.bind(x)


def log2(x):
    """log2 x (f32, x > 0), one lg2.approx.ftz in a Triton kernel."""
    return _log2_p.bind(x)


def rcp(x):
    """1 / x (f32), one rcp.approx.ftz in a Triton kernel."""
    return _rcp_p.bind(x)


def _sigmoid_approx(x):
    return rcp(1.0 + exp2(x * -LOG2E))


def _softplus_approx(x):
    w = exp2(jnp.abs(x) * -LOG2E)
    u = 1.0 + w
    l1p = jnp.where(u == 1.0, w, log2(u) * _LN2 * w * rcp(u - 1.0))
    return jnp.maximum(x, 0.0) + l1p


def _composite(name, exact, approx):
    """A primitive that is `exact` (jnp) off the GPU and `approx` (fastmath primitives) in a Triton kernel: XLA's
    CPU simplifier would fold the log1p trick's (1 + w) - 1 to w."""
    rule = triton_lowering.lower_fun(approx, multiple_results=False) if triton_lowering is not None else None
    return _primitive(name, exact, rule)


_sigmoid_p = _composite("wmjax_sigmoid_approx", jax.nn.sigmoid, _sigmoid_approx)
_softplus_p = _composite("wmjax_softplus_approx", lambda x: jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x))),
                         _softplus_approx)


def sigmoid(x):
    """1 / (1 + e^-x) (f32): in a Triton kernel rcp(1 + 2^(-x log2 e)), 0 below x ~ -88."""
    return _sigmoid_p.bind(x)


def softplus(x):
    """log(1 + e^x) (f32) = max(x, 0) + log1p(e^-|x|): in a Triton kernel log1p(w) = log(u) w / (u - 1) with
    u = 1 + w (w where u rounds to 1)."""
    return _softplus_p.bind(x)
