"""Pallas (Triton backend) decode attention of one Doge layer: from the fused q/k/v projection to the attention
output, with the new key/value/bias written into the layer's cache in place (`input_output_aliases`).

One query token per row, a full cache no longer than keep_window_size (every visible key is kept):

    q_h = rope(rms_norm(q_h; q_norm)),  k_g = rope(rms_norm(k_g; k_norm))     h = g R .. g R + R - 1, R = H / G
    bias_g = exp(A_g * softplus(v . W_dt[g] + b_dt[g]))                       (v = all kv heads' values; in f32)
    out_h = softmax([s_c ; s_n]) @ [V ; v_g],  s_c = scale q_h . K_c + (bias_c if valid_c else finfo(f32).min),
            s_n = scale q_h . k_g + bias_g        (the new token, always visible)
    cache[slot] <- (k_g, v_g, bias_g)

Grid: one 1-D grid; programs 0 .. batch G - 1 are (row, kv head) attention programs: the group's R query heads as
one [max(16, R), D/2] tile per half of head_dim, an online softmax over blocks of block_c cached slots (tensor-core
dots, f32 accumulation; p @ V as two dots p_hi + p_lo for 16-bit dtypes). After them the prefetch programs
(`prefetch=`) read weights used next (3 tiles of 64 x 256 each) so that they are in L2 when read again.
Layouts: see `decode_layer_attention`. `reference.decode_layer_attention_reference` defines the meaning;
measured figures: docs/KERNELS.md, Decode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

__all__ = ["decode_layer_attention"]

_F32 = jnp.float32


def _softplus(x):
    # jax.nn.softplus(x) = logaddexp(x, 0) = max(x, 0) + log1p(exp(-|x|))
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def _kernel(*refs, n_inputs, kv_heads, n_attention, has_dt_bias, prefetch_plan, **static):
    """One 1-D grid: programs 0 .. n_attention - 1 = (row, kv head) attention programs (row-major), then the
    prefetch programs (`prefetch_plan`), which only load their share of the prefetch inputs."""
    refs = list(refs)
    n_pre = len(prefetch_plan)
    ins, outs = refs[:n_inputs], refs[n_inputs:]
    pre_refs, ins = ins[len(ins) - n_pre:], ins[:len(ins) - n_pre]
    touch_ref = outs.pop() if n_pre else None
    pid = pl.program_id(0)
    g = pid % kv_heads

    def attention():
        _attention_program(*ins, *outs, g=g, kv_heads=kv_heads, has_dt_bias=has_dt_bias, **static)

    if not n_pre:
        attention()
        return
    pl.when(pid < n_attention)(attention)
    q = pid - n_attention
    for ref, (start, count, rows, col_chunk, per_program) in zip(pre_refs, prefetch_plan):
        def prefetch(ref=ref, start=start, rows=rows, col_chunk=col_chunk, per_program=per_program):
            # chunks c0 .. c0 + per_program - 1 of the weight ([rows, col_chunk] tiles, row-major; indices past the
            # last chunk re-read it), each into a tensor-core dot with a ones tile so that the loop is Triton's
            # pipelined matmul loop (num_stages chunks in flight; a load feeding only a sum is issued and waited
            # for one at a time); the result is stored so that the loads are not dead code (its value is unused)
            n_col = ref.shape[1] // col_chunk
            last = (ref.shape[0] // rows) * n_col - 1
            c0 = (q - start) * per_program
            ones = jnp.ones((16, col_chunk), ref.dtype)

            def body(t, acc):
                c = jnp.minimum(c0 + t, last)
                tile = ref[pl.ds(pl.multiple_of((c // n_col) * rows, rows), rows),
                           pl.ds(pl.multiple_of((c % n_col) * col_chunk, col_chunk), col_chunk)]
                return acc + lax.dot_general(ones, tile, (((1,), (1,)), ((), ())), preferred_element_type=_F32)

            acc = lax.fori_loop(0, per_program, body, jnp.zeros((16, rows), _F32))
            touch_ref[...] = jnp.full(touch_ref.shape, jnp.sum(acc), _F32)

        pl.when((q >= start) & (q < start + count))(prefetch)


def _attention_program(slot_ref, qkv_ref, q3_ref, cos_ref, sin_ref, valid_ref, qn_ref, kn_ref, wdt_ref, *rest, g,
                       heads_per_group, kv_heads, head_dim, eps, scale, block_c, n_blocks, qk_norm, has_dt_bias,
                       tile_rows, dt_len):
    """Program (row, kv head g): the group's R query heads as one [tile_rows, D/2] tile per half of head_dim
    (rows >= R are zeros, never written), scores and p @ V as tensor-core dots; see the module docstring."""
    rest = list(rest)
    dtb_ref = rest.pop(0) if has_dt_bias else None
    a_ref, k_ref, v_ref, b_ref = rest[:4]
    att_ref, k_out, v_out, b_out = rest[4:]
    d, half, r_n, tr = head_dim, head_dim // 2, heads_per_group, tile_rows
    dtype = cos_ref.dtype
    cdt = k_out.dtype
    rnd = lambda x: x.astype(dtype)
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    h_all = r_n * kv_heads
    k_base = h_all * d + g * d
    v_base = (h_all + kv_heads) * d
    gd = kv_heads * d
    # dots: bf16/f16 tensor-core products are exact in f32 (f32 accumulation); f32 inputs need HIGHEST (IEEE, not
    # TF32) for the same exact-product contract
    prec = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(_F32) else lax.Precision.DEFAULT
    dot = lambda a, b, dims: lax.dot_general(a, b, (dims, ((), ())), precision=prec, preferred_element_type=_F32)
    real = lax.broadcasted_iota(jnp.int32, (tr, half), 0) < r_n                  # [TR, D/2]: rows that are heads

    # every load first (q heads g R .. g R + R - 1 of this row as [TR, D/2] tiles; masked rows load zeros)
    cos_a, cos_b, sin_a, sin_b = cos_ref[lo], cos_ref[hi], sin_ref[lo], sin_ref[hi]
    q_rows = pl.ds(g * r_n, tr)
    q_raw = (pltr.load(q3_ref.at[q_rows, lo], mask=real, other=0),
             pltr.load(q3_ref.at[q_rows, hi], mask=real, other=0))
    k_raw = (qkv_ref[pl.ds(k_base, half)], qkv_ref[pl.ds(k_base + half, half)])
    va, vb = qkv_ref[pl.ds(v_base + g * d, half)], qkv_ref[pl.ds(v_base + g * d + half, half)]
    if dt_len == gd:
        v_all, w_dt = qkv_ref[pl.ds(v_base, gd)], wdt_ref[...]
    else:   # G D not a power of two: one zero-padded vector of dt_len (masked loads at clamped offsets, so
        # nothing past G D is read; a static pl.ds past the block's end is rejected at trace time)
        lane = lax.broadcasted_iota(jnp.int32, (dt_len,), 0)
        in_gd, at = lane < gd, jnp.minimum(lane, gd - 1)
        v_all = pltr.load(qkv_ref.at[v_base + at], mask=in_gd, other=0)
        w_dt = pltr.load(wdt_ref.at[at], mask=in_gd, other=0)
    qn_w = (qn_ref[lo], qn_ref[hi]) if qk_norm else None
    kn_w = (kn_ref[lo], kn_ref[hi]) if qk_norm else None
    dt_b = dtb_ref[...] if has_dt_bias else None
    a_g = a_ref[...]
    slot = slot_ref[0]
    cos_a, cos_b = cos_a.astype(_F32), cos_b.astype(_F32)
    sin_a, sin_b = sin_a.astype(_F32), sin_b.astype(_F32)

    def norm_rope(raw, w, axis):
        # raw: the two halves, [D/2] (one head) or [TR, D/2] (a tile of heads, one reduction over axis 1)
        a, b = raw
        ex = (lambda t: t[None, :]) if axis else (lambda t: t)
        if qk_norm:
            a32, b32 = a.astype(_F32), b.astype(_F32)
            ss = jnp.sum(a32 * a32 + b32 * b32, axis=axis, keepdims=bool(axis))
            rstd = 1.0 / jnp.sqrt(ss / d + eps)
            a = ex(w[0].astype(dtype)) * (a32 * rstd).astype(a.dtype)
            b = ex(w[1].astype(dtype)) * (b32 * rstd).astype(b.dtype)
        a32, b32 = rnd(a).astype(_F32), rnd(b).astype(_F32)
        ra = rnd(rnd(a32 * ex(cos_a)).astype(_F32) + rnd(-b32 * ex(sin_a)).astype(_F32))
        rb = rnd(rnd(b32 * ex(cos_b)).astype(_F32) + rnd(a32 * ex(sin_b)).astype(_F32))
        return ra, rb

    # the new key (normed, rotated) and value, in the cache dtype as stored
    ka, kb = norm_rope(k_raw, kn_w, None)
    ka, kb = ka.astype(cdt), kb.astype(cdt)
    va, vb = va.astype(cdt), vb.astype(cdt)
    # dt_proj over all kv heads' values -> this head's key bias, in f32 as the model's (v rounded to dtype; W_dt and
    # b_dt as given, f32 from prepare_decode_params): one f32 sum of the G D products
    dt = jnp.sum(v_all.astype(dtype).astype(_F32) * w_dt.astype(_F32))
    if has_dt_bias:
        dt = dt + dt_b.astype(_F32)                                                    # [1]
    bias_new = jnp.exp(a_g.astype(_F32) * _softplus(dt))                               # [1]

    # cache writes (the slot is not read as valid this step: its score is masked either way)
    k_out[pl.ds(slot, 1), lo] = ka[None, :]
    k_out[pl.ds(slot, 1), hi] = kb[None, :]
    v_out[pl.ds(slot, 1), lo] = va[None, :]
    v_out[pl.ds(slot, 1), hi] = vb[None, :]
    b_out[pl.ds(slot, 1)] = bias_new

    # q tiles: zero rows stay finite through the norm (rstd = 1/sqrt(eps)) and rope, so padding scores are the
    # biases alone: no NaN/inf in any row
    qa, qb = norm_rope(q_raw, qn_w, 1)                                                # [TR, D/2] in dtype
    kna, knb = ka.astype(dtype).astype(_F32), kb.astype(dtype).astype(_F32)
    s_new = jnp.sum(qa.astype(_F32) * kna[None, :] + qb.astype(_F32) * knb[None, :], axis=1)
    m0 = s_new * scale + jnp.sum(bias_new)                                            # [TR]
    acc0 = (jnp.broadcast_to(va.astype(dtype).astype(_F32)[None, :], (tr, half)),
            jnp.broadcast_to(vb.astype(dtype).astype(_F32)[None, :], (tr, half)))
    neg = jnp.finfo(_F32).min
    l0 = jnp.ones((tr,), _F32)
    split_p = jnp.dtype(dtype) != jnp.dtype(_F32)  # p @ V as p_hi @ V + p_lo @ V

    def pv(p, vc):
        # p [TR, BC] f32 @ V [BC, D/2]. f32: one IEEE dot. 16-bit V: p = p_hi + p_lo, both in the compute dtype,
        # two tensor-core dots with exact products and f32 sums: p is kept to ~16 of its 24 bits (relative error
        # ~2^-17 per p for bf16), against the reference's exact f32 products
        if not split_p:
            return dot(p, vc, ((1,), (0,)))
        p_hi = p.astype(dtype)
        p_lo = (p - p_hi.astype(_F32)).astype(dtype)
        return dot(p_hi, vc, ((1,), (0,))) + dot(p_lo, vc, ((1,), (0,)))

    def body(j, carry):
        m, l, acc_a, acc_b = carry
        cols = pl.ds(pl.multiple_of(j * block_c, block_c), block_c)
        kc_a, kc_b = k_ref[cols, lo].astype(dtype), k_ref[cols, hi].astype(dtype)      # [BC, D/2]
        vc_a, vc_b = v_ref[cols, lo].astype(dtype), v_ref[cols, hi].astype(dtype)
        add = jnp.where(valid_ref[cols] != 0, b_ref[cols], neg)                        # [BC]
        s = dot(qa, kc_a, ((1,), (1,))) + dot(qb, kc_b, ((1,), (1,)))                  # [TR, BC] f32
        s = s * scale + add[None, :]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        return (m_new, l * alpha + jnp.sum(p, axis=1), acc_a * alpha[:, None] + pv(p, vc_a),
                acc_b * alpha[:, None] + pv(p, vc_b))

    m, l, acc_a, acc_b = lax.fori_loop(0, n_blocks, body, (m0, l0) + acc0)
    # only the R real heads' rows are stored (masked rows are never written)
    out_a, out_b = acc_a / l[:, None], acc_b / l[:, None]
    pltr.store(att_ref.at[q_rows, lo], out_a.astype(att_ref.dtype), mask=real)
    pltr.store(att_ref.at[q_rows, hi], out_b.astype(att_ref.dtype), mask=real)


def _check(qkv, cos, valid, q_norm, dt_weight, A, key_cache, bias_cache, num_heads, block_c, interpret):
    b, g, c, d = key_cache.shape
    problems = []
    if qkv.shape[1] != (num_heads + 2 * g) * d or qkv.shape[0] < b:
        problems.append(f"qkv {qkv.shape} is not [rows >= {b}, (H={num_heads} + 2 G={g}) D={d}]")
    if num_heads % g:
        problems.append(f"num_heads {num_heads} is not a multiple of kv heads {g}")
    if cos.shape != (b, d) or valid.shape != (b, c):
        problems.append(f"cos {cos.shape} / valid {valid.shape} are not [{b}, {d}] / [{b}, {c}]")
    if q_norm.shape != (d,) or dt_weight.shape != (g, g * d) or A.shape != (g,):
        problems.append(f"q_norm {q_norm.shape}, dt_weight {dt_weight.shape}, A {A.shape} are not "
                        f"[{d}], [{g}, {g * d}], [{g}]")
    if bias_cache.shape != (b, g, c):
        problems.append(f"bias cache {bias_cache.shape} != {(b, g, c)}")
    # on the GPU Triton's dots need D/2 >= 16 (interpret mode, e.g. the tiny CPU test models, takes D >= 8)
    min_d = 8 if interpret else 32
    if d < min_d or d & (d - 1):
        problems.append(f"head_dim {d} must be a power of two >= {min_d}")
    if block_c < 16 or block_c & (block_c - 1) or c % block_c:
        problems.append(f"cache length {c} must be a multiple of block_c={block_c} (a power of two >= 16)")
    if problems:
        raise ValueError("decode_layer_attention: " + "; ".join(problems))


def _prefetch_plan(prefetch, start, rows=64, col_chunk=256, per_program=3):
    """Per prefetch array [N, K]: (first program, programs, tile rows, tile columns, tiles per program). Tiles of
    `rows` x `col_chunk` (each the largest power of two <= it dividing N / K; 32 KB for bf16 at the defaults),
    `per_program` per program (3: Doge-160M's 10.7 MB of next weights in ~110 programs, one wave on the SMs the
    attention leaves idle). N and K must be multiples of 16 (the tiles feed tensor-core dots)."""
    plan = []
    for w in prefetch:
        n, k = w.shape
        fit = lambda size, cap: max(b for b in (1 << e for e in range(cap.bit_length())) if size % b == 0 and b <= cap)
        tr, tc = fit(n, rows), fit(k, col_chunk)
        tiles = (n // tr) * (k // tc)
        count = -(-tiles // per_program)
        plan.append((start, count, tr, tc, per_program))
        start += count
    return tuple(plan)


def decode_layer_attention(qkv, cos, sin, valid, slot, q_norm, k_norm, dt_weight, dt_bias, A, key_cache,
                           value_cache, bias_cache, *, num_heads: int, eps: float, scale: float, qk_norm=True,
                           block_c: int = 128, num_warps: int = 4, num_stages: int = 2, prefetch=(),
                           interpret: bool = False):
    """Returns (att [rows, H D] in cos.dtype, key_cache, value_cache, bias_cache) with slot `slot` of every
    (row, kv head) written; att rows >= batch are not written.

    Layouts: qkv [rows, (H + 2G) D] (the fused projection's output: q heads, k heads, v heads; only the first
    `batch` rows are read); cos, sin [batch, D]; valid [batch, C] int32 (1 = slot holds a token visible to this
    query; the slot being written is not valid); slot int32 scalar or [1]; q_norm, k_norm [D]; dt_weight [G, G D]
    (the transpose of dt_proj's kernel); dt_bias [G] or None; A [G]; key/value caches [batch, G, C, D]; bias
    cache [batch, G, C] f32; C a multiple of block_c. The caches are aliased to the outputs (in place on GPU).
    head_dim a power of two >= 32 on the GPU (Triton's dots need D/2 >= 16; interpret mode takes >= 8).

    prefetch: 2-D arrays (the weights of the projections that run next) that extra programs of this kernel read
    (`_prefetch_plan`) while the batch x kv heads attention programs run, so that those weights are in L2 when
    their projections read them. Nothing is computed from them."""
    _check(qkv, cos, valid, q_norm, dt_weight, A, key_cache, bias_cache, num_heads, block_c, interpret)
    prefetch = tuple(prefetch)
    for w in prefetch:
        if w.ndim != 2 or w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"decode_layer_attention: prefetch arrays must be 2-D weights with both sizes multiples "
                             f"of 16; got {w.shape}")
    b, g, c, d = key_cache.shape
    rows, width = qkv.shape
    has_dt_bias = dt_bias is not None
    n_attention = b * g
    plan = _prefetch_plan(prefetch, n_attention)
    n_programs = n_attention + sum(p[1] for p in plan)
    kern = functools.partial(_kernel, heads_per_group=num_heads // g, kv_heads=g, head_dim=d, eps=float(eps),
                             scale=float(scale), block_c=block_c, n_blocks=c // block_c, qk_norm=bool(qk_norm),
                             has_dt_bias=has_dt_bias, tile_rows=max(16, _next_pow2(num_heads // g)),
                             dt_len=_next_pow2(g * d), n_attention=n_attention, prefetch_plan=plan)
    # one 1-D grid: program p < n_attention is (row i, kv head j) row-major; the prefetch programs after them see
    # row indices clamped into range (they touch none of those blocks)
    i_ = lambda p: jnp.minimum(p // g, b - 1)
    j_ = lambda p: p % g
    row = lambda n: pl.BlockSpec((None, n), lambda p: (i_(p), 0))
    heads = lambda n: pl.BlockSpec((None, n, d), lambda p: (i_(p), 0, 0))   # [rows, heads, D] view, row i
    full = lambda n: pl.BlockSpec((n,), lambda p: (0,))
    head1 = pl.BlockSpec((1,), lambda p: (j_(p),))
    cache_spec = pl.BlockSpec((None, None, c, d), lambda p: (i_(p), j_(p), 0, 0))
    bias_spec = pl.BlockSpec((None, None, c), lambda p: (i_(p), j_(p), 0))
    # qkv also as [rows, H + 2G, D] (the same buffer: a bitcast in XLA) for the q-head tiles
    specs = [full(1), row(width), heads(num_heads + 2 * g)]
    operands = [jnp.reshape(jnp.asarray(slot, jnp.int32), (1,)), qkv, qkv.reshape(rows, num_heads + 2 * g, d)]
    specs += [row(d), row(d), row(c), full(d), full(d), pl.BlockSpec((None, g * d), lambda p: (j_(p), 0))]
    operands += [cos, sin, valid.astype(jnp.int32), q_norm, k_norm, dt_weight]
    if has_dt_bias:
        specs.append(head1), operands.append(dt_bias)
    specs += [head1, cache_spec, cache_spec, bias_spec]
    operands += [A, key_cache, value_cache, bias_cache]
    n_cache_end = len(operands)
    specs += [pl.BlockSpec(w.shape, lambda p: (0, 0)) for w in prefetch]
    operands += list(prefetch)
    # att written as [rows, H, D] (masked [TR, D/2] tile stores), reshaped back (a bitcast)
    out_shapes = [jax.ShapeDtypeStruct((rows, num_heads, d), cos.dtype),
                  jax.ShapeDtypeStruct(key_cache.shape, key_cache.dtype),
                  jax.ShapeDtypeStruct(value_cache.shape, value_cache.dtype),
                  jax.ShapeDtypeStruct(bias_cache.shape, bias_cache.dtype)]
    out_specs = [heads(num_heads), cache_spec, cache_spec, bias_spec]
    if prefetch:  # one f32 per program: the prefetch programs' sums (unused; keeps their loads alive)
        out_shapes.append(jax.ShapeDtypeStruct((n_programs,), _F32))
        out_specs.append(pl.BlockSpec((1,), lambda p: (p,)))
    outs = pl.pallas_call(
        functools.partial(kern, n_inputs=len(operands)), out_shape=tuple(out_shapes), grid=(n_programs,),
        in_specs=specs, out_specs=tuple(out_specs),
        input_output_aliases={n_cache_end - 3: 1, n_cache_end - 2: 2, n_cache_end - 1: 3},
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="wmjax_decode_layer_attention",
    )(*operands)
    att, kc, vc, bc = outs[:4]
    return att.reshape(rows, num_heads * d), kc, vc, bc
