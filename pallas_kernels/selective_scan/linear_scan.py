"""``linear_scan``: the first-order linear recurrence as an in-register associative scan inside a Pallas Triton kernel.

Pallas' Triton backend lowers only one scan, ``cumsum`` (``tt.scan`` with an add). The chunked selective scan needs
``tt.scan`` (Triton's ``tl.associative_scan``) with tuple operands, so this module defines a small primitive,
``linear_scan_p``, with three lowerings:
* Triton (inside ``pallas_call`` on GPU): one ``tt.scan`` whose combine region is written here with ``arith`` ops
  and ``math.fma`` (Pallas does not contract a b + c into one instruction); a reverse scan is flip, forward scan,
  flip, the flips register renames along the in-thread axis (Triton lowers ``reverse=True`` with warp shuffles),
  registered in Pallas' Triton rule table (``jax._src.pallas.triton.lowering.triton_lowering_rules``, the same private
  table and ``tt.scan`` builder in jax 0.10.2 and 0.11.2);
* everywhere else (Pallas interpret mode, plain jit): ``lax.associative_scan`` with the same combine;
* abstract eval: the operands' shapes.

Kinds (``combine(acc, new)``, ``acc`` the elements already scanned, as in Triton; ``reverse=True`` scans from the
end: flip, scan, flip back, so ``acc`` then holds the *later* elements):
* ``"linear"`` (a, b): (a_acc a_new, a_new b_acc + b_new). Forward, elements (a_t, b_t) give
  (prod_{s<=t} a_s, H_t) with H_t = a_t H_{t-1} + b_t, H_{-1} = 0.
* ``"adjoint"`` (f, m, k), reverse only: a suffix [t..s] is (f = a_t, m = prod_{t<r<=s} a_r,
  k = sum_{t<=u<=s} prod_{t<r<=u} a_r g_u); elements (a_t, 1, g_t) give at t the suffix [t..end]: k_t = G_t with
  G_t = g_t + a_{t+1} G_{t+1} (G past the end = 0) and m_t = prod_{t<r<=end} a_r, without shifting a by one token.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax._src import core as jax_core

from pallas_kernels.triton_rules import arith_dialect, ir, math_dialect, primitive, triton_lowering, tt_dialect

__all__ = ["linear_scan", "linear_scan_p"]

_N_OPERANDS = {"linear": 2, "adjoint": 3}


def _fma(a, b, c):
    return a * b + c


def _combine(kind, acc, new, fma=_fma):
    """The combine on any values with * (jnp arrays, or ``_Mlir`` wrappers of f32 scalars) and fma(a, b, c) =
    a b + c (one fused op in the Triton region)."""
    if kind == "linear":
        (a1, b1), (a2, b2) = acc, new
        return a1 * a2, fma(a2, b1, b2)
    # adjoint, reverse: acc = the later suffix (R), new = the earlier element(s) (L)
    (fR, mR, kR), (fL, mL, kL) = acc, new
    w = mL * fR
    return fL, w * mR, fma(w, kR, kL)


class _Mlir:
    """An f32 MLIR value with * (arith.mulf) and fma (math.fma), to write the combine region once."""

    def __init__(self, v):
        self.v = v

    def __mul__(self, o):
        return _Mlir(arith_dialect.mulf(self.v, o.v))

    @staticmethod
    def fma(a, b, c):
        return _Mlir(math_dialect.fma(a.v, b.v, c.v))


def linear_scan(*operands, kind="linear", axis=0, reverse=False):
    """Inclusive scan of the tuple `operands` (same shape, f32) along `axis` with the combine `kind` (module doc).
    Returns a tuple like `operands`."""
    if len(operands) != _N_OPERANDS[kind]:
        raise ValueError(f"linear_scan kind {kind!r} takes {_N_OPERANDS[kind]} operands, got {len(operands)}")
    if kind == "adjoint" and not reverse:
        raise ValueError("linear_scan kind 'adjoint' is a reverse scan")
    shapes = {tuple(o.shape) for o in operands}
    if len(shapes) != 1:
        raise ValueError(f"linear_scan operands must share one shape, got {shapes}")
    return tuple(linear_scan_p.bind(*operands, kind=kind, axis=axis % operands[0].ndim, reverse=bool(reverse)))


def _abstract_eval(*avals, kind, axis, reverse):
    del kind, axis, reverse
    return [jax_core.ShapedArray(a.shape, a.dtype) for a in avals]


def _impl(*operands, kind, axis, reverse):
    ops = tuple(operands)
    if reverse:
        ops = tuple(jnp.flip(o, axis) for o in ops)
    out = lax.associative_scan(lambda acc, new: _combine(kind, acc, new), ops, axis=axis)
    if reverse:
        out = tuple(jnp.flip(o, axis) for o in out)
    return list(out)


def _flip(v, axis):
    """v reversed along `axis`, row by row: row i is a masked sum over `axis` (the other rows -0.0) put back at
    n - 1 - i by a select. On an axis that lies inside a thread the masks are constants per register and
    x + (-0.0) = x, so LLVM folds this to a renaming of registers: no instructions, and every tile keeps the
    operand's layout (a wider tile would give Triton a second layout, and it then computes operands twice)."""
    n = v.shape[axis]
    t = lax.broadcasted_iota(jnp.int32, v.shape, axis)
    out = v
    for i in range(n):
        row = jnp.sum(jnp.where(t == i, v, -0.0), axis=axis, keepdims=True)
        out = jnp.where(t == n - 1 - i, jnp.broadcast_to(row, v.shape), out)
    return out


def _flipped(*operands, kind, axis):
    """The reverse scan as flip, forward scan, flip (Triton lowers ``tt.scan(reverse=True)`` with warp shuffles
    even along an axis inside a thread)."""
    out = linear_scan_p.bind(*(_flip(o, axis) for o in operands), kind=kind, axis=axis, reverse=False)
    return [_flip(o, axis) for o in out]


def _triton_rule(ctx, *operands, kind, axis, reverse):
    if reverse:
        return triton_lowering.lower_fun(_flipped, multiple_results=True)(ctx, *operands, kind=kind, axis=axis)
    n = len(operands)
    op = tt_dialect.ScanOp(list(operands), axis, reverse)
    elem = [ir.RankedTensorType(v.type).element_type for v in operands]
    block = op.regions[0].blocks.append(*(elem * 2))
    with ir.InsertionPoint.at_block_begin(block):
        args = [_Mlir(a) for a in block.arguments]
        out = _combine(kind, tuple(args[:n]), tuple(args[n:]), fma=_Mlir.fma)
        tt_dialect.scan_return([o.v for o in out])
    op.verify()
    return list(op.result)


linear_scan_p = primitive("wmjax_linear_scan", _impl, _triton_rule, abstract_eval=_abstract_eval,
                          multiple_results=True)
