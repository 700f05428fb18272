"""Decode kernels (pallas_kernels/decode) against their plain-jnp references, in Pallas interpret mode, and their
Triton lowering for an abstract H100 (interpret mode hides lowering errors). Tolerances: f32 1e-5 (the kernels
sum in a different order than XLA), bf16 2e-2 relative (one bf16 rounding of a differently ordered sum)."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from abstract_gpu import abstract_h100
from pallas_kernels.decode import tuning as decode_tuning
from pallas_kernels.decode import (decode_layer_attention, decode_layer_attention_reference, decode_linear,
                                   decode_linear_reference)
from pallas_kernels.decode.attention import _prefetch_plan
from pallas_kernels.decode.linear import _fit_block_k
from wmjax.cache import init_cache
from wmjax.config import DogeConfig
from wmjax.fused_decode import fused_decode_step, fused_decode_supported, prepare_decode_params
from wmjax.layers.rope import rope_cos_sin
from wmjax.models.doge import init_params

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _close(got, want, tol, msg=""):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol,
                               err_msg=msg)


_VARIANTS = ["plain", "norm_bias", "swiglu", "residual", "logits_f32"]
# k, block_ks: (96, (32, 64)): 3 fori_loop steps of 32, block_k 64 does not divide 96 -> falls back to 32;
# (1536, (256,)): Doge-160M's ffn width, 6 steps of 256; (48, (32,)): block_k fallback 32 -> 16, 3 steps of 16.
# Every variant at every K, and every variant and every K in both dtypes (all pairs of the three; the 30-case
# product took a minute of the suite for no other path).
_LINEAR_CASES = [(v, k, bks, (jnp.float32, jnp.bfloat16)[(i + j) % 2])
                 for i, v in enumerate(_VARIANTS) for j, (k, bks) in enumerate([(96, (32, 64)), (1536, (256,)),
                                                                                (48, (32,))])]


@pytest.mark.parametrize("variant,k,block_ks,dtype", _LINEAR_CASES)
def test_decode_linear_matches_reference(dtype, variant, k, block_ks):
    x, w, kw = _linear_args(np.random.default_rng(0), dtype, variant, 32, k)
    want = decode_linear_reference(x, w, **kw)
    for block_k in block_ks:
        got = decode_linear(x, w, block_n=16, block_k=block_k, interpret=True, **kw)
        chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
        _close(got, want, TOL[dtype], f"{variant} block_k={block_k}")


def _linear_args(rng, dtype, variant, rows, k, n=64):
    a = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, dtype)
    x, w = a(rows, k), a(n, k, scale=k ** -0.5)
    kw = {}
    if variant in ("norm_bias", "swiglu", "logits_f32"):
        kw.update(norm_weight=jnp.asarray(1 + rng.normal(size=k) * 0.1, jnp.float32), eps=1e-6)
    if variant in ("norm_bias", "swiglu"):
        kw.update(bias=a(n))
    if variant == "swiglu":
        kw.update(up_weight=a(n, k, scale=k ** -0.5), up_bias=a(n))
    if variant == "residual":
        kw.update(residual=a(rows, n), residual_scale=jnp.asarray(rng.normal(size=n), jnp.float32))
    if variant == "logits_f32":
        kw.update(out_dtype=jnp.float32)
    return x, w, kw


# gemv form (real_rows=1): row 0 only, to TOL. f32 1e-5: the same f32 products as the reference's HIGHEST-precision
# dot, summed in another order (a row reduction per chunk, then across chunks); observed <= 1.4e-6. bf16 2e-2
# relative: the bf16 x bf16 products are exact in f32, so only the f32 sum's order differs, and each bf16 rounding
# of it (the projection, then bias / SwiGLU / residual) can land one ulp away (<= 2^-7 = 7.8e-3 relative); the norm's
# sum of squares in another order can flip one element of the normed x by an ulp; SwiGLU multiplies two such values,
# so up to ~2 ulps (~1.6e-2). Observed at K=1536: <= 8e-3 of 1 + |want| (SwiGLU), 4e-3 for the others.
GEMV_TOL = TOL


# rows, k, block_k: (16, 1536, 256): Doge-160M's ffn width, 6 fori_loop steps of 256, rows padded as the fused step
# does; (1, 96, 64): one row (the gemv form needs no padding), block_k 64 falls back to 32, 3 steps. Every variant
# at both shapes, in both dtypes and with both block_n; dtype x shape, dtype x block_n and shape x block_n all
# covered (all pairs of the four; the 40-case product took a minute of the suite).
_GEMV_CASES = [(v, *shape, dt, bn)
               for i, v in enumerate(_VARIANTS)
               for shape, dt, bn in ([((16, 1536, 256), jnp.float32, 4), ((1, 96, 64), jnp.bfloat16, 8)] if i % 2 == 0
                                     else [((16, 1536, 256), jnp.bfloat16, 8), ((1, 96, 64), jnp.float32, 4)])]
_GEMV_CASES += [("plain", 16, 1536, 256, jnp.float32, 8), ("plain", 1, 96, 64, jnp.bfloat16, 4)]


@pytest.mark.parametrize("variant,rows,k,block_k,dtype,block_n", _GEMV_CASES)
def test_decode_linear_gemv_matches_reference_row0(dtype, variant, rows, k, block_k, block_n):
    x, w, kw = _linear_args(np.random.default_rng(5), dtype, variant, rows, k)
    want = decode_linear_reference(x, w, **kw)
    got = decode_linear(x, w, block_n=block_n, block_k=block_k, real_rows=1, interpret=True, **kw)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)   # [rows, N] in the same dtype; only row 0 is defined
    _close(got[0], want[0], GEMV_TOL[dtype], f"{variant} block_n={block_n}")


def test_decode_linear_gemv_reads_only_row0():
    """Rows 1.. of x and of the residual do not change row 0 (NaN there stays out of it)."""
    rng = np.random.default_rng(6)
    x, w, kw = _linear_args(rng, jnp.float32, "residual", 16, 64)
    kw["norm_weight"] = jnp.ones((64,), jnp.float32)
    want = decode_linear_reference(x, w, **kw)[0]
    x = x.at[1:].set(jnp.nan)
    kw["residual"] = kw["residual"].at[1:].set(jnp.nan)
    got = decode_linear(x, w, block_n=1, block_k=16, real_rows=1, interpret=True, **kw)
    _close(got[0], want, 1e-5)


def test_decode_linear_rejects_bad_shapes():
    x = jnp.zeros((16, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"weight \(32, 48\) is not \[N, K=64\]"):
        decode_linear(x, jnp.zeros((32, 48)), interpret=True)
    with pytest.raises(ValueError, match="rows 8 must be a multiple of 16"):
        decode_linear(jnp.zeros((8, 64)), jnp.zeros((32, 64)), interpret=True)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two >= 16 dividing N=96"):
        decode_linear(x, jnp.zeros((96, 64)), block_n=48, interpret=True)
    with pytest.raises(ValueError, match="block_k=48 must be a power of two >= 16"):
        decode_linear(x, jnp.zeros((32, 64)), block_k=48, interpret=True)
    with pytest.raises(ValueError, match="K=40 a multiple of 16"):
        decode_linear(jnp.zeros((16, 40)), jnp.zeros((32, 40)), interpret=True)
    # the dot form keeps block_n >= 16; the gemv form takes any power of two >= 1 dividing N
    with pytest.raises(ValueError, match="block_n=8 must be a power of two >= 16 dividing N=32"):
        decode_linear(x, jnp.zeros((32, 64)), block_n=8, interpret=True)
    with pytest.raises(ValueError, match=r"block_n=6 must be a power of two >= 1 dividing N=96 \(gemv form"):
        decode_linear(x, jnp.zeros((96, 64)), block_n=6, real_rows=1, interpret=True)
    with pytest.raises(ValueError, match=r"block_n=64 must be a power of two >= 1 dividing N=32 \(gemv form"):
        decode_linear(x, jnp.zeros((32, 64)), block_n=64, real_rows=1, interpret=True)
    with pytest.raises(ValueError, match="block_k=48 must be a power of two >= 16"):
        decode_linear(x, jnp.zeros((32, 64)), block_n=4, block_k=48, real_rows=1, interpret=True)
    for bad in (0, 2, 16, True, 1.0):
        with pytest.raises(ValueError, match="must be None .every row. or 1"):
            decode_linear(x, jnp.zeros((32, 64)), real_rows=bad, interpret=True)
    with pytest.raises(ValueError, match=r"x \(2, 16, 64\) is not \[rows, K\]"):
        decode_linear(jnp.zeros((2, 16, 64)), jnp.zeros((32, 64)), interpret=True)
    # gemv form: rows need not be a multiple of 16
    assert decode_linear(jnp.zeros((3, 64)), jnp.zeros((32, 64)), block_n=4, real_rows=1,
                         interpret=True).shape == (3, 32)


def test_decode_linear_block_k_fallback():
    assert _fit_block_k(1536, 256) == 256
    assert _fit_block_k(768, 512) == 256      # 768 = 3 x 256
    assert _fit_block_k(96, 64) == 32
    assert _fit_block_k(48, 32) == 16
    assert _fit_block_k(64, 256) == 64        # K below block_k: one chunk of all of K
    assert _fit_block_k(80, 256) == 16


def _attention_args(rng, dtype, b=3, rows=16, h=4, g=2, d=32, c=128, slot=70, dt_bias=True):
    a = lambda *shape, scale=1.0, dt=dtype: jnp.asarray(rng.normal(size=shape) * scale, dt)
    pos = rng.integers(60, 200, size=b)
    cos, sin = rope_cos_sin(jnp.asarray(pos)[:, None], d, 10000.0, dtype=dtype)
    valid = rng.random((b, c)) < 0.7
    valid[:, slot:] = False
    return (a(rows, (h + 2 * g) * d), cos[:, 0], sin[:, 0], jnp.asarray(valid, jnp.int32), jnp.int32(slot),
            jnp.asarray(1 + rng.normal(size=d) * 0.1, jnp.float32), jnp.asarray(1 + rng.normal(size=d) * 0.1, jnp.float32),
            a(g, g * d, scale=(g * d) ** -0.5), a(g, scale=0.5) if dt_bias else None,
            jnp.asarray(rng.normal(size=g), jnp.float32), a(b, g, c, d), a(b, g, c, d),
            jnp.asarray(rng.normal(size=(b, g, c)), jnp.float32)), dict(num_heads=h, eps=1e-6, scale=d ** -0.5)


# attention: f32 to 1e-5 (only the summation order differs: the kernel's tile dots vs XLA's einsums); bf16 to 1e-2
# (each output is one bf16 rounding, 2^-8 = 3.9e-3 relative, of an f32 result whose order of summation differs; the
# kernel's p @ V with p split into two bf16 parts adds ~2^-17 relative; a normed key can land one bf16
# ulp away where the kernel's 1/sqrt and the reference's reciprocal(sqrt) differ in the last f32 bit)
ATT_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _check_attention(args, kw, dtype, qk_norm, slot=70):
    want = decode_layer_attention_reference(*args, qk_norm=qk_norm, **kw)
    got = decode_layer_attention(*args, qk_norm=qk_norm, block_c=32, interpret=True, **kw)
    b = args[-1].shape[0]
    tol = ATT_TOL[dtype]
    chex.assert_trees_all_equal_shapes_and_dtypes(got[0], want[0])
    _close(got[0][:b], want[0][:b], tol, "att")
    for name, g_, w_ in zip(("keys", "values", "biases"), got[1:], want[1:]):
        chex.assert_trees_all_equal_shapes_and_dtypes(g_, w_)
        _close(g_, w_, tol, name)
    # only slot `slot` of the caches changed
    for before, after in zip(args[-3:], got[1:]):
        np.testing.assert_array_equal(np.delete(np.asarray(after, np.float32), slot, axis=2),
                                      np.delete(np.asarray(before, np.float32), slot, axis=2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dt_bias,qk_norm", [(True, True), (False, False)])
def test_decode_layer_attention_matches_reference(dtype, dt_bias, qk_norm):
    args, kw = _attention_args(np.random.default_rng(1), dtype, dt_bias=dt_bias)
    _check_attention(args, kw, dtype, qk_norm)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("h,g", [
    (2, 2),   # R = 1 (H = G): one real row of the 16-row q tile
    (8, 2),   # R = 4
    (6, 3),   # Doge-160M's R = 2 with G = 3: G D = 96 is not a power of two (zero-padded dt vector)
])
def test_decode_layer_attention_group_sizes(dtype, h, g):
    args, kw = _attention_args(np.random.default_rng(3), dtype, h=h, g=g)
    _check_attention(args, kw, dtype, True)


def test_decode_layer_attention_prefetch_changes_nothing():
    """Extra prefetch programs (weights read while the attention runs) leave every output bit-identical; the plan
    gives each weight row blocks of ~24 KB or less and column chunks dividing K."""
    args, kw = _attention_args(np.random.default_rng(10), jnp.bfloat16, b=1, rows=1)
    rng = np.random.default_rng(11)
    pre = (jnp.asarray(rng.normal(size=(64, 96)), jnp.bfloat16), jnp.asarray(rng.normal(size=(48, 1536)), jnp.float32))
    # (first program, programs, tile rows, tile columns, tiles per program): 64 x 96 -> 3 tiles of 64 x 32 (one
    # program); 48 x 1536 -> 18 tiles of 16 x 256 (6 programs)
    assert _prefetch_plan(pre, 2) == ((2, 1, 64, 32, 3), (3, 6, 16, 256, 3))
    assert _prefetch_plan((jnp.zeros((768, 768)), jnp.zeros((1536, 768))), 3) == (
        (3, 12, 64, 256, 3), (15, 24, 64, 256, 3))
    want = decode_layer_attention(*args, block_c=32, interpret=True, **kw)
    got = decode_layer_attention(*args, block_c=32, prefetch=pre, interpret=True, **kw)
    chex.assert_trees_all_equal(got, want)
    for bad in (jnp.zeros(16), jnp.zeros((24, 32))):
        with pytest.raises(ValueError, match="prefetch arrays must be 2-D weights with both sizes multiples of 16"):
            decode_layer_attention(*args, prefetch=(bad,), interpret=True, **kw)


def test_decode_layer_attention_rejects_bad_shapes():
    args, kw = _attention_args(np.random.default_rng(2), jnp.float32)
    with pytest.raises(ValueError, match="block_c=48"):
        decode_layer_attention(*args, block_c=48, interpret=True, **kw)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        decode_layer_attention(*args, interpret=True, **dict(kw, num_heads=3))
    # the kernel's Triton dots need D/2 >= 16 (checked before lowering; interpret mode takes head_dim 16,
    # see test_decode_layer_attention_small_head_dim)
    args16, kw16 = _attention_args(np.random.default_rng(2), jnp.float32, d=16)
    with pytest.raises(ValueError, match="head_dim 16 must be a power of two >= 32"):
        decode_layer_attention(*args16, **kw16)


def test_decode_layer_attention_small_head_dim():
    """head_dim 16 (the size of tests/test_sampling.py's tiny models): interpret mode runs the kernel body."""
    args, kw = _attention_args(np.random.default_rng(4), jnp.float32, d=16)
    _check_attention(args, kw, jnp.float32, True)


def test_decode_kernels_lower_for_h100():
    """Doge-160M shapes (hidden 768, ffn 1536, 6 heads / 3 kv heads, head_dim 128, vocab 32768), 16 rows."""
    s, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    rows, hid, ffn, h, g, d, c, b = 16, 768, 1536, 6, 3, 128, 384, 2
    lin = [
        ((s((rows, hid), bf), s(((h + 2 * g) * d, hid), bf), s((hid,), f32)),
         lambda x, w, nw: decode_linear(x, w, norm_weight=nw)),
        ((s((rows, hid), bf), s((ffn, hid), bf), s((ffn, hid), bf), s((hid,), f32)),
         lambda x, w, u, nw: decode_linear(x, w, up_weight=u, norm_weight=nw)),
        ((s((rows, ffn), bf), s((hid, ffn), bf), s((rows, hid), bf), s((hid,), f32)),
         lambda x, w, r, rs: decode_linear(x, w, residual=r, residual_scale=rs)),
        ((s((rows, hid), bf), s((32768, hid), bf), s((hid,), f32)),
         lambda x, w, nw: decode_linear(x, w, norm_weight=nw, out_dtype=f32, block_n=64)),
    ]
    # the gemv form (real_rows=1: 1-D x row and output blocks, multiply + row reduction instead of a dot, block_n
    # below 16): qkv with the norm, SwiGLU with the norm, down with the residual, o with bias + residual in f32
    gemv = lambda **kw: functools.partial(decode_linear, real_rows=1, **kw)
    lin += [
        ((s((rows, hid), bf), s(((h + 2 * g) * d, hid), bf), s((hid,), f32)),
         lambda x, w, nw: gemv(block_n=8)(x, w, norm_weight=nw)),
        ((s((rows, hid), bf), s((ffn, hid), bf), s((ffn, hid), bf), s((hid,), f32)),
         lambda x, w, u, nw: gemv(block_n=8)(x, w, up_weight=u, norm_weight=nw)),
        ((s((rows, ffn), bf), s((hid, ffn), bf), s((rows, hid), bf), s((hid,), f32)),
         lambda x, w, r, rs: gemv(block_n=4)(x, w, residual=r, residual_scale=rs)),
        ((s((1, h * d), f32), s((hid, h * d), f32), s((hid,), f32), s((1, hid), f32), s((hid,), f32)),
         lambda x, w, b, r, rs: gemv(block_n=4)(x, w, bias=b, residual=r, residual_scale=rs)),
    ]
    att_shapes = (s((rows, (h + 2 * g) * d), bf), s((b, d), bf), s((b, d), bf), s((b, c), jnp.int32),
                  s((), jnp.int32), s((d,), f32), s((d,), f32), s((g, g * d), bf), s((g,), f32),
                  s((b, g, c, d), bf), s((b, g, c, d), bf), s((b, g, c), f32))
    # attention (the masked 2-D loads/stores, dots and row reductions must lower), block_c 128 (the default) and 64
    att = [(att_shapes, lambda *x, bc=bc: decode_layer_attention(*x[:8], None, *x[8:], num_heads=h, eps=1e-6,
                                                                 scale=d ** -0.5, block_c=bc))
           for bc in (128, 64)]
    # and in f32 with a dt bias (HIGHEST-precision dots, one unsplit p @ V dot)
    att_f32 = tuple(s(x.shape, f32) if x.dtype == bf else x for x in att_shapes)
    att.append((att_f32[:8] + (s((g,), f32),) + att_f32[8:],
                lambda *x: decode_layer_attention(*x, num_heads=h, eps=1e-6, scale=d ** -0.5)))
    # batch 1 as the fused step runs it, prefetching a layer's o / gate / up / down and the next q/k/v weights
    att1 = (s((1, (h + 2 * g) * d), bf), s((1, d), bf), s((1, d), bf), s((1, c), jnp.int32)) + att_shapes[4:9] + (
        s((1, g, c, d), bf), s((1, g, c, d), bf), s((1, g, c), f32))
    pre = (s((hid, h * d), bf), s((ffn, hid), bf), s((ffn, hid), bf), s((hid, ffn), bf), s(((h + 2 * g) * d, hid), bf))
    att.append((att1 + pre, lambda *x: decode_layer_attention(*x[:8], None, *x[8:12], num_heads=h, eps=1e-6,
                                                              scale=d ** -0.5, prefetch=x[12:])))
    with abstract_h100():
        for shapes, fn in lin + att:
            text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
            assert "wmjax_decode_" in text


def test_fused_decode_step_lowers_for_h100():
    """The whole fused decode step (`wmjax.fused_decode.fused_decode_step`, implementation "pallas": the Triton
    kernels, not interpret mode) lowers for an abstract H100, bf16: two layers with every bias (head_dim 32, hidden
    128, vocab 1000 padded to the LM head's block, cache 300 slots padded to the attention's block), at batch 1
    (the projections' gemv form, the attention prefetching the next weights) and batch 3 (the dot form on 16
    padded rows): 5 Triton kernels per layer + the LM head."""
    cfg = DogeConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, keep_window_size=512,
                     tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    assert fused_decode_supported(cfg, "full", 300)
    bf = jnp.bfloat16
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    fparams = jax.eval_shape(lambda p: prepare_decode_params(cfg, p, bf), params)
    for batch, form in ((1, "wmjax_decode_linear_gemv"), (3, "wmjax_decode_linear")):
        state = jax.eval_shape(lambda: init_cache(cfg, batch, 300, bf, "full", multiple_of=128))
        ints = jax.ShapeDtypeStruct((batch,), jnp.int32)
        step = lambda fp, st, tok, pos: fused_decode_step(cfg, bf, fp, st, tok, pos, implementation="pallas")
        with abstract_h100():
            text = jax.jit(step).trace(fparams, state, ints, ints).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 5 * 2 + 1, batch
        assert set(re.findall(r"wmjax_decode_\w+", text)) == {form, "wmjax_decode_layer_attention"}, batch


def test_tuning_override_hook():
    """Benchmarks change the tuned defaults through `tuning.override` only: nested blocks apply and undo their
    fields, an unknown field is refused by name, and an inconsistent setting by DecodeTuning's own check."""
    default = decode_tuning.current()
    assert default == decode_tuning.DecodeTuning()
    with decode_tuning.override(gemv_warps=2) as outer:
        assert outer.gemv_warps == 2 and decode_tuning.current().gemv_warps == 2
        with decode_tuning.override(cache_block=64):
            assert (decode_tuning.current().gemv_warps, decode_tuning.current().cache_block) == (2, 64)
        assert decode_tuning.current().cache_block == default.cache_block
    assert decode_tuning.current() == default
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['warps'\]"):
        with decode_tuning.override(warps=4):
            pass
    with pytest.raises(ValueError, match="gemv_logits_block_n=48 must divide logits_block_n=64"):
        with decode_tuning.override(gemv_logits_block_n=48):
            pass
    assert decode_tuning.current() == default
