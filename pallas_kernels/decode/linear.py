"""Pallas (Triton backend) projection for decode: a few rows times a weight, with the layer's glue fused in.

At decode time a projection is a handful of rows [rows, K] times a weight [N, K]: it reads the whole weight for
very little arithmetic, so its cost is one pass over the weight plus the launch. XLA lowers a batch-1 projection
to a weight-sized multiply followed by a reduce (two kernels) and runs the RMSNorm before it and the residual or
SwiGLU after it as kernels of their own. This kernel does the whole chain in one launch:

    xn  = rms_norm(x; norm_weight)            (optional prologue; wmjax.layers.norm.rms_norm's rounding steps)
    y   = xn @ W^T (+ bias)                   f32 accumulation, rounded to the compute dtype as nn.Dense does
    out = silu(y) * (xn @ U^T (+ up_bias))    (optional SwiGLU epilogue: W = gate, U = up)
    out = residual_scale * residual + y       (optional residual epilogue, Doge's learnable residual scale)

Layouts: x [rows, K] (dot form: rows a multiple of 16, tensor-core dots need M >= 16; the caller pads), weights
stored [N, K] (the transpose of flax's [in, out] kernel, so each program reads contiguous rows of K), biases [N],
norm_weight [K], residual [rows, N], residual_scale [N]. N a multiple of block_n (a power of two), K a multiple
of 16. One program per block of block_n output columns. K is walked by a `lax.fori_loop` over K / block_k chunks
of one size (block_k, or when it does not divide K the largest power of two >= 16 that does and is <= block_k,
see `_fit_block_k`), each a `pl.ds(pl.multiple_of(j * block_k, block_k), block_k)` slice of the refs: the
standard Triton matmul loop, which Triton's software pipeliner can turn into `num_stages` weight chunks in
flight through shared memory (cp.async) instead of one chunk's load, wait and dot after another (H100, bs 1,
Doge-160M, the call alone, 3 stages against 1: qkv 4.36 vs 4.60 us, o 2.86 vs 3.31, gate/up 5.14 vs 5.96, down
4.19 vs 5.38; docs/BENCHMARKS.md, Sampling). The RMSNorm's
sum of squares over all of K comes first, in a fori_loop pass of its own; inside the main loop each normalized x
chunk is recomputed from x, the rstd and the norm weight chunk. Every `pallas_call` names the Triton backend.
The reference `decode_linear_reference` is the same computation in plain jnp and defines its meaning.

The combine prologue (`x_lse` given; for the split decode attention, `pallas_kernels.decode.attention` with
num_splits > 1): x is then [S, rows, K] f32, the S splits' partial attention outputs, and x_lse [S, rows, K] their
log-sum-exps; each x chunk is `combine_partials` of the S partial chunks (static loop over S), rounded to the
compute dtype, before the product: the attention's last step runs in the projection that consumes it, so the
split attention needs no kernel of its own for the combine. Measured on an H100 (bs 1, 3 splits, the o projection
alone): 5.99 us against 2.47 without it (the partials' loads feed no dot, so they are not pipelined); the fused
step leaves the attention unsplit by default (`wmjax.fused_decode.FusedDecodeOptions.attention_splits`).

The gemv form (`real_rows=1`; the default `real_rows=None` is the dot form above, unchanged) is for batch 1, where
the caller pads x to 16 rows: 15/16 of each dot is wasted, and block_n >= 16 caps the grid at N / 16 programs
(Doge-160M's o and down projections, N=768: 48 programs for an H100's 132 SMs, too few weight bytes in flight;
the dot form above at bs 1, the call alone: qkv 4.4 us, o 2.9, gate/up 5.1, down 4.2 for 2.4, 1.2, 4.7 (both) and
2.4 MB of bf16 weights that the H100's ~3.35 TB/s moves in ~0.35-1.4 us). It reads only x row 0 (x [K] in the kernel)
and computes only output row 0: per K chunk, sum(w_chunk.f32 * x_chunk.f32[None, :], axis=1) into an f32 [block_n]
accumulator, i.e. the dot's exact f32 products (bf16 inputs) summed in another order, then the same prologue and
epilogue rounding steps. No tensor-core dot, so block_n may be any power of two >= 1 dividing N (4 or 8: 4-8x the
programs) and rows any count >= 1. Output rows 1.. are not written (undefined) and residual rows 1.. are not read:
only a caller that reads row 0 alone may use it (wmjax.fused_decode at batch 1 is one: there x has one row).
Measured on an H100 (Doge-160M, bs 1, docs/BENCHMARKS.md, Sampling, session 5): alone (L2-warm) with block_n 4 and
1 warp qkv 3.00 us, o 2.22, gate/up 4.19, down 3.29 (dot form 4.38 / 2.88 / 5.17 / 4.25); in the decode step with
the weights in HBM its loads (which feed no dot, so Triton does not pipeline them) make it no faster than the dot
form for gate/up and down, and with the weights pulled into L2 by the attention kernel's prefetch programs it is
the fastest: 3.96 / 2.58 / 4.71 / 4.08 us in the step, the fused step's default at batch 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

__all__ = ["decode_linear", "decode_linear_reference", "combine_partials"]

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def combine_partials(parts, lse, dtype):
    """Split-softmax partial outputs -> the full output, rounded to `dtype` (flash-decoding's combine).

    parts [S, ..., K] f32: each split's softmax-normalized output o_s = sum_c p_sc V_c / l_s over its share of the
    keys; lse [S, ..., K] f32: its log-sum-exp m_s + log(l_s), broadcast over the head's dimensions. Returns
    sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M), M = max_s lse_s: the softmax over all the splits' keys
    (f32), rounded to `dtype` as the unsplit attention rounds its output. A split that saw no visible key has
    lse ~ finfo(f32).min and weight 0."""
    m = jnp.max(lse, axis=0)
    w = jnp.exp(lse - m[None])
    return (jnp.sum(w * parts, axis=0) / jnp.sum(w, axis=0)).astype(dtype)


def _rounded_silu_mul(gate, up, dtype):
    """silu(gate) * up with the compute dtype's rounding after each op (jax.nn.silu then a multiply)."""
    sig = jax.nn.sigmoid(gate.astype(_F32)).astype(dtype)
    act = (gate.astype(_F32) * sig.astype(_F32)).astype(dtype)
    return (act.astype(_F32) * up.astype(_F32)).astype(dtype)


def _fit_block_k(k_total: int, block_k: int) -> int:
    """The K chunk size of the fori_loop: block_k if it divides K, else the largest power of two dividing K that
    is <= block_k (K=96, block_k 64 -> 32; K=48, block_k 32 -> 16). `_check` requires block_k a power of two
    >= 16 and K a multiple of 16, so the result is >= 16 (a tensor-core dot's K)."""
    bk = block_k
    while bk > 1 and k_total % bk:
        bk //= 2
    return bk


def _linear_kernel(*refs, k_total, block_k, eps, has_norm, has_bias, has_up, has_residual, gemv, splits):
    """Both forms. Dot form: x [rows, K], residual / output [rows, block_n], tensor-core dots. gemv form
    (real_rows=1): x [K], residual / output [block_n] (row 0; the row dimension is squeezed out by the BlockSpecs),
    viewed here as one row [1, ...], and the product is a multiply and a row reduction instead of a dot.
    splits > 0: x_ref holds [S, rows, K] (gemv: [S, K]) f32 partials and the next ref their log-sum-exps."""
    refs = list(refs)
    x_ref = refs.pop(0)
    lse_ref = refs.pop(0) if splits else None
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
    x_dtype = dtype if splits else x_ref.dtype                           # the (combined) x's dtype

    def chunk(j):
        return pl.ds(pl.multiple_of(j * block_k, block_k), block_k)

    def load_row(ref, ck, *lead):                                      # [rows, chunk]
        return ref[(*lead, ck)][None, :] if gemv else ref[(*lead, slice(None), ck)]

    def load_x(ck):                                                    # [rows, chunk]
        if not splits:
            return load_row(x_ref, ck)
        # combine_partials on the chunk, unrolled over the S splits
        lses = [load_row(lse_ref, ck, s) for s in range(splits)]
        parts = [load_row(x_ref, ck, s) for s in range(splits)]
        m = functools.reduce(jnp.maximum, lses)
        ws = [jnp.exp(ls - m) for ls in lses]
        num = functools.reduce(jnp.add, [w * o for w, o in zip(ws, parts)])
        return (num / functools.reduce(jnp.add, ws)).astype(dtype)

    def product(xk, wk):                                               # [rows, chunk] x [block_n, chunk]^T, f32
        if gemv:  # the dot's f32 products (exact for bf16 inputs) summed over the chunk: no M >= 16 needed
            return jnp.sum(wk.astype(_F32) * xk.astype(_F32), axis=1)[None, :]
        return lax.dot_general(xk, wk, _NT, precision=prec, preferred_element_type=_F32)

    # One fixed-size chunk per fori_loop iteration. The static Python loop this replaces put each chunk's load next
    # to its dot with num_stages=1, so (a warp issuing in order) chunk j+1's load waited for chunk j's data and
    # dot: K / block_k memory latencies in series. Issuing every chunk's load first (the whole [block_n, K] slab in
    # registers) measured 1.0-2.4x slower on an H100 (register spills; docs/BENCHMARKS.md, Sampling). The loop
    # leaves the prefetching to Triton's pipeliner (num_stages chunks in flight through shared memory): 0.2-1.2 us
    # less per call than the static loop on the H100 at bs 1 (module docstring).
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
            xk = nw_ref[ck].astype(dtype)[None, :] * (xk.astype(_F32) * rstd[:, None]).astype(x_dtype)
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
    y = _epilogue(accs, dtype, col(b_ref) if has_bias else None, col(ub_ref) if has_bias and has_up else None,
                  residual, col(rs_ref) if has_residual else None).astype(o_ref.dtype)
    o_ref[...] = y[0] if gemv else y


def _epilogue(accs, dtype, bias, up_bias, residual, residual_scale):
    """The f32 accumulator(s) -> the compute dtype, + bias, SwiGLU, residual: the reference's rounding steps. bias,
    up_bias, residual, residual_scale: None or a function that loads it (called where the value is first needed,
    the order of the kernel's loads); bias, up_bias and residual_scale load in the compute dtype, shaped to
    broadcast against the accumulator."""
    y = accs[0].astype(dtype)
    if bias is not None:
        y = y + bias()
    if len(accs) > 1:
        up = accs[1].astype(dtype)
        if up_bias is not None:
            up = up + up_bias()
        y = _rounded_silu_mul(y, up, dtype)
    if residual is not None:
        res = residual()
        scaled = (residual_scale().astype(_F32) * res.astype(_F32)).astype(dtype)
        y = (scaled.astype(_F32) + y.astype(_F32)).astype(dtype)
    return y


def _check(x, weight, block_n, block_k, up_weight, norm_weight, bias, up_bias, residual, residual_scale,
           real_rows=None, x_lse=None):
    problems = []
    if x_lse is not None:
        if x.ndim != 3 or x_lse.shape != x.shape or x.dtype != _F32 or x_lse.dtype != _F32:
            raise ValueError(f"decode_linear: with x_lse, x and x_lse must both be [S, rows, K] f32 partials; got x "
                             f"{x.shape} {x.dtype}, x_lse {x_lse.shape} {x_lse.dtype}")
        x = x[0]
    elif x.ndim != 2:
        raise ValueError(f"decode_linear: x {x.shape} is not [rows, K] (partials [S, rows, K] need x_lse)")
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
                  num_warps: int = 4, num_stages: int = 3, real_rows: int | None = None, x_lse=None,
                  interpret: bool = False):
    """x [rows, K] -> [rows, N] in `out_dtype` (default: the weight's dtype = the compute dtype). See the module
    docstring for the optional RMSNorm prologue (norm_weight, eps), bias, SwiGLU (up_weight, up_bias) and
    residual (residual, residual_scale) parts. K is looped over in chunks of `_fit_block_k(K, block_k)` (block_k
    when it divides K); num_stages is Triton's pipeline depth for that loop (chunks in flight).

    real_rows: None (default) = every row is computed, tensor-core dots (rows a multiple of 16, block_n a power of
    two >= 16). 1 = the gemv form: only x row 0 is read and only output row 0 is computed and written; output rows
    1.. are left unwritten (undefined: whatever the output buffer held; residual rows 1.. are not read). Any rows
    >= 1; block_n any power of two >= 1 dividing N (more programs for a small N).

    x_lse: None (x is [rows, K]) or [S, rows, K] f32, the log-sum-exps of the S partial outputs in x [S, rows, K]
    f32 (split attention): x is first `combine_partials(x, x_lse, weight.dtype)` (module docstring)."""
    _check(x, weight, block_n, block_k, up_weight, norm_weight, bias, up_bias, residual, residual_scale, real_rows,
           x_lse)
    splits = 0 if x_lse is None else x.shape[0]
    rows, k = x.shape[-2:]
    n = weight.shape[0]
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    gemv = real_rows is not None
    # the gemv form maps the row dimension of x, the residual and the output to row 0, squeezed out (None) of the
    # kernel's blocks: its refs are x [K], residual / output [block_n]
    row_block = None if gemv else rows
    if splits:
        part_spec = pl.BlockSpec((splits, row_block, k), lambda i: (0, 0, 0))
        operands, specs = [x, x_lse, weight], [part_spec, part_spec]
    else:
        operands, specs = [x, weight], [pl.BlockSpec((row_block, k), lambda i: (0, 0))]
    specs.append(pl.BlockSpec((block_n, k), lambda i: (i, 0)))
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
                             has_up=up_weight is not None, has_residual=residual is not None, gemv=gemv,
                             splits=splits)
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype), grid=(n // block_n,), in_specs=specs,
        out_specs=pl.BlockSpec((row_block, block_n), lambda i: (0, i)),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="wmjax_decode_linear_gemv" if gemv else "wmjax_decode_linear",
    )(*operands)


def decode_linear_reference(x, weight, *, up_weight=None, norm_weight=None, eps: float = 1e-6, bias=None,
                            up_bias=None, residual=None, residual_scale=None, out_dtype=None, x_lse=None):
    """Plain-jnp `decode_linear` (same arguments and rounding steps; any rows)."""
    from wmjax.layers.norm import rms_norm
    dtype = weight.dtype
    if x_lse is not None:
        x = combine_partials(x, x_lse, dtype)
    out_dtype = dtype if out_dtype is None else out_dtype
    prec = lax.Precision.HIGHEST if dtype == _F32 else None
    xn = x if norm_weight is None else rms_norm(x, norm_weight, eps, dtype)
    xn = xn.astype(dtype)
    y = lax.dot_general(xn, weight, _NT, precision=prec, preferred_element_type=_F32).astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype)
    if up_weight is not None:
        up = lax.dot_general(xn, up_weight, _NT, precision=prec, preferred_element_type=_F32).astype(dtype)
        if up_bias is not None:
            up = up + up_bias.astype(dtype)
        y = _rounded_silu_mul(y, up, dtype)
    if residual is not None:
        scaled = (residual_scale.astype(dtype).astype(_F32) * residual.astype(_F32)).astype(dtype)
        y = (scaled.astype(_F32) + y.astype(_F32)).astype(dtype)
    return y.astype(out_dtype)
