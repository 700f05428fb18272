"""Primitives of our own with a rule in Pallas' Triton lowering: one place for the private imports and the
registration that `fastmath`, `lanes` and `selective_scan/linear_scan` share.

Pallas' Triton backend lowers a primitive through its rule table (``jax._src.pallas.triton.lowering``, private, the
same in jax 0.10.2 and 0.11.2). ``primitive`` defines one whose impl (plain jnp) is also its XLA lowering, so the
same op runs in Pallas interpret mode and plain jit, and registers its Triton rule when the backend is there
(``triton_lowering`` is None otherwise: no GPU lowering). ``inline_asm`` is the one-instruction f32 rule body.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src.interpreters import mlir

try:  # Pallas' Triton backend (private modules; absent or changed in other jax versions -> no GPU lowering)
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith as arith_dialect
    from jax._src.lib.mlir.dialects import math as math_dialect
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as triton_lowering
except ImportError:  # pragma: no cover - depends on the jax build
    ir = arith_dialect = math_dialect = tt_dialect = triton_lowering = None

try:
    from jax.extend.core import Primitive
except ImportError:  # older jax
    from jax.core import Primitive

__all__ = ["arith_dialect", "inline_asm", "ir", "like_first", "math_dialect", "primitive", "triton_lowering",
           "tt_dialect"]


def like_first(*avals, **params):
    """Abstract eval: the first operand's shape and dtype."""
    del params
    return jax_core.ShapedArray(avals[0].shape, avals[0].dtype)


def primitive(name, impl, triton_rule, abstract_eval=like_first, multiple_results=False):
    """A primitive `name`: impl(*arrays, **params) everywhere but in a Triton kernel, triton_rule(ctx, *values,
    **params) there."""
    p = Primitive(name)
    p.multiple_results = multiple_results
    p.def_abstract_eval(abstract_eval)
    p.def_impl(impl)
    mlir.register_lowering(p, mlir.lower_fun(impl, multiple_results=multiple_results))
    if triton_lowering is not None and triton_rule is not None:
        triton_lowering.register_lowering(p)(triton_rule)
    return p


def inline_asm(ctx, what, asm, x):
    """The f32 value x through one PTX instruction `asm` ($0 result, $1 operand), elementwise over the tile;
    `what` names the op in the dtype error."""
    if ctx.avals_in[0].dtype != jnp.float32:
        raise TypeError(f"{what} takes float32 in a Triton kernel, got {ctx.avals_in[0].dtype}")
    [out] = ctx.avals_out
    return tt_dialect.elementwise_inline_asm([mlir.aval_to_ir_type(ctx.context.mlir_ctx, out)], asm,
                                             constraints="=r,r", pure=True, packed_element=1, args=[x])
