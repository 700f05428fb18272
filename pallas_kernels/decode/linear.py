"""Pallas (Triton backend) projection for decode: a few rows times a weight, with the layer's glue fused in.

    xn  = rms_norm(x; norm_weight)            (optional prologue)
    y   = xn @ W^T (+ bias)                   f32 accumulation, rounded to the compute dtype as nn.Dense does
    out = silu(y) * (xn @ U^T (+ up_bias))    (optional SwiGLU epilogue: W = gate, U = up)
    out = residual_scale * residual + y       (optional residual epilogue, Doge's learnable residual scale)

Layouts: x [rows, K]; weights stored [N, K] (each program reads contiguous rows of K); biases [N]; norm_weight [K];
residual [rows, N]; residual_scale [N]. Grid: one program per block of block_n output columns; K walked by a
fori_loop over chunks of `_fit_block_k(K, block_k)` (Triton pipelines num_stages chunks in flight). Dot form
(default): rows a multiple of 16 (tensor-core dots), block_n a power of two >= 16. gemv form (`real_rows=1`, batch
1): reads x row 0 only and writes output row 0 only (a multiply and a row reduction per chunk, no dot), block_n any
power of two dividing N. The RMSNorm's sum of squares is a first pass over K. `reference.decode_linear_reference`
defines the meaning (the same rounding steps); measured figures: docs/KERNELS.md, Decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.decode.reference import epilogue

__all__ = ["decode_linear"]

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _fit_block_k(k_total: int, block_k: int) -> int:
    """The K chunk size of the fori_loop: block_k if it divides K, else the largest power of two dividing K that
    is <= block_k (K=96, block_k 64 -> 32; K=48, block_k 32 -> 16). `_check` requires block_k a power of two
    >= 16 and K a multiple of 16, so the result is >= 16 (a tensor-core dot's K)."""
    bk = block_k
    while bk > 1 and k_total % bk:
        bk //= 2
    return bk


def _linear_kernel(*refs, k_total, block_k, eps, has_norm, has_bias, has_up, has_residual, gemv):
    """Both forms. Dot form: x [rows, K], residual / output [rows, block_n], tensor-core dots. gemv form
    (real_rows=1): x [K], residual / output [block_n] (row 0; the row dimension is squeezed out by the BlockSpecs),
    viewed here as one row [1, ...], and the product is a multiply and a row reduction instead of a dot."""
    refs = list(refs)
    x_ref = refs.pop(0)
    w_ref = refs.pop(0)
    u_ref = refs.pop(0) if has_up else None
    nw_ref = refs.pop(0) if has_norm else None
    b_ref = refs.pop(0) if has_bias else None
    ub_ref = refs.pop(0) if has_bias and has_up else None
    r_ref, rs_ref = (refs.pop(0), refs.pop(0)) if has_residual else (None, None)
    (o_ref,) = refs
    dtype = w_ref.dtype
    prec = lax.Precision.HIGHEST if dtype == _F32 else None
    rows, block_n = (1 if gemv else x_ref.shape[-2]), w_ref.shape[0]
    n_chunks = k_total // block_k

    def chunk(j):
        return pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

    def load_x(ck):                                                    # [rows, chunk]
        return x_ref[ck][None, :] if gemv else x_ref[:, ck]

    def product(xk, wk):                                               # [rows, chunk] x [block_n, chunk]^T, f32
        if gemv:  # the dot's f32 products (exact for bf16 inputs) summed over the chunk: no M >= 16 needed
            return jnp.sum(wk.astype(_F32) * xk.astype(_F32), axis=1)[None, :]
        return lax.dot_general(xk, wk, _NT, precision=prec, preferred_element_type=_F32)

    # one fixed-size chunk per fori_loop iteration, each load next to its use: Triton's pipeliner keeps
    # num_stages chunks in flight (loading every chunk first spills registers; docs/KERNELS.md, Decode)
    if has_norm:
        def sum_squares(j, ss):
            xk = load_x(chunk(j)).astype(_F32)
            return ss + jnp.sum(xk * xk, axis=1)

        ss = lax.fori_loop(0, n_chunks, sum_squares, jnp.zeros((rows,), _F32))
        rstd = 1.0 / jnp.sqrt(ss / k_total + eps)                       # [rows]

    def step(j, accs):
        ck = chunk(j)
        xk = load_x(ck)
        if has_norm:
            xk = nw_ref[ck].astype(dtype)[None, :] * (xk.astype(_F32) * rstd[:, None]).astype(x_ref.dtype)
        xk = xk.astype(dtype)
        out = [accs[0] + product(xk, w_ref[:, ck])]
        if has_up:
            out.append(accs[1] + product(xk, u_ref[:, ck]))
        return tuple(out)

    zeros = jnp.zeros((rows, block_n), _F32)
    accs = lax.fori_loop(0, n_chunks, step, (zeros, zeros) if has_up else (zeros,))
    col = lambda ref: lambda: ref[...].astype(dtype)[None, :]         # loads [block_n] as a [1, block_n] row
    residual = None
    if has_residual:
        residual = (lambda: r_ref[...][None, :]) if gemv else (lambda: r_ref[...])
    y = epilogue(accs, dtype, col(b_ref) if has_bias else None, col(ub_ref) if has_bias and has_up else None,
                 residual, col(rs_ref) if has_residual else None).astype(o_ref.dtype)
    o_ref[...] = y[0] if gemv else y


def _check(x, weight, block_n, block_k, up_weight, norm_weight, bias, up_bias, residual, residual_scale,
           real_rows=None):
    problems = []
    if x.ndim != 2:
        raise ValueError(f"decode_linear: x {x.shape} is not [rows, K]")
    rows, k = x.shape
    n, k2 = weight.shape
    if real_rows is not None and (type(real_rows) is not int or real_rows != 1):
        problems.append(f"real_rows={real_rows!r} must be None (every row) or 1 (row 0 only, the gemv form)")
        real_rows = None  # check the rest by the dot form's rules
    if k2 != k:
        problems.append(f"weight {weight.shape} is not [N, K={k}]")
    if up_weight is not None and up_weight.shape != weight.shape:
        problems.append(f"up_weight {up_weight.shape} != weight {weight.shape}")
    if norm_weight is not None and norm_weight.shape != (k,):
        problems.append(f"norm_weight {norm_weight.shape} != ({k},)")
    for name, v in (("bias", bias), ("up_bias", up_bias), ("residual_scale", residual_scale)):
        if v is not None and v.shape != (n,):
            problems.append(f"{name} {v.shape} != ({n},)")
    if (residual is None) != (residual_scale is None):
        problems.append("residual and residual_scale go together")
    if residual is not None and residual.shape != (rows, n):
        problems.append(f"residual {residual.shape} != ({rows}, {n})")
    if up_bias is not None and up_weight is None:
        problems.append("up_bias without up_weight")
    if (bias is None) != (up_bias is None) and up_weight is not None:
        problems.append("bias and up_bias go together in the SwiGLU form")
    if real_rows is None:
        if rows % 16:
            problems.append(f"rows {rows} must be a multiple of 16 (the caller pads)")
        if block_n < 16 or block_n & (block_n - 1) or n % block_n:
            problems.append(f"block_n={block_n} must be a power of two >= 16 dividing N={n}")
    else:
        if rows < 1:
            problems.append(f"rows {rows}: the gemv form (real_rows=1) needs row 0")
        if block_n < 1 or block_n & (block_n - 1) or n % block_n:
            problems.append(f"block_n={block_n} must be a power of two >= 1 dividing N={n} "
                            "(gemv form, real_rows=1)")
    if block_k < 16 or block_k & (block_k - 1) or k % 16:
        problems.append(f"block_k={block_k} must be a power of two >= 16 and K={k} a multiple of 16")
    if problems:
        raise ValueError("decode_linear: " + "; ".join(problems))


def decode_linear(x, weight, *, up_weight=None, norm_weight=None, eps: float = 1e-6, bias=None, up_bias=None,
                  residual=None, residual_scale=None, out_dtype=None, block_n: int = 16, block_k: int = 256,
                  num_warps: int = 4, num_stages: int = 3, real_rows: int | None = None, interpret: bool = False):
    """x [rows, K] -> [rows, N] in `out_dtype` (default: the weight's dtype = the compute dtype), with the optional
    RMSNorm prologue (norm_weight, eps), bias, SwiGLU (up_weight, up_bias) and residual (residual, residual_scale)
    of the module docstring. num_stages: Triton's pipeline depth for the K loop.

    real_rows: None (default) = every row is computed, tensor-core dots (rows a multiple of 16, block_n a power of
    two >= 16). 1 = the gemv form: only x row 0 is read and only output row 0 is computed and written; output rows
    1.. are left unwritten (undefined; residual rows 1.. are not read). Any rows >= 1; block_n any power of two
    >= 1 dividing N."""
    _check(x, weight, block_n, block_k, up_weight, norm_weight, bias, up_bias, residual, residual_scale, real_rows)
    rows, k = x.shape
    n = weight.shape[0]
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    gemv = real_rows is not None
    # the gemv form maps the row dimension of x, the residual and the output to row 0, squeezed out (None) of the
    # kernel's blocks: its refs are x [K], residual / output [block_n]
    row_block = None if gemv else rows
    operands = [x, weight]
    specs = [pl.BlockSpec((row_block, k), lambda i: (0, 0)), pl.BlockSpec((block_n, k), lambda i: (i, 0))]
    col = pl.BlockSpec((block_n,), lambda i: (i,))
    if up_weight is not None:
        operands.append(up_weight), specs.append(pl.BlockSpec((block_n, k), lambda i: (i, 0)))
    if norm_weight is not None:
        operands.append(norm_weight), specs.append(pl.BlockSpec((k,), lambda i: (0,)))
    if bias is not None:
        operands.append(bias), specs.append(col)
        if up_weight is not None:
            operands.append(up_bias), specs.append(col)
    if residual is not None:
        operands += [residual, residual_scale]
        specs += [pl.BlockSpec((row_block, block_n), lambda i: (0, i)), col]
    kern = functools.partial(_linear_kernel, k_total=k, block_k=_fit_block_k(k, block_k), eps=float(eps),
                             has_norm=norm_weight is not None, has_bias=bias is not None,
                             has_up=up_weight is not None, has_residual=residual is not None, gemv=gemv)
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype), grid=(n // block_n,), in_specs=specs,
        out_specs=pl.BlockSpec((row_block, block_n), lambda i: (0, i)),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="wmjax_decode_linear_gemv" if gemv else "wmjax_decode_linear",
    )(*operands)
