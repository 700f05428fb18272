"""Flash dynamic-mask attention kernel (pallas_kernels.dmattn) vs the O(L^2) reference (pallas_kernels.dmattn.reference).

CPU: Pallas interpret mode for values (outputs, dq, dk, dv, d_bias; f32 rel err <= 1e-4 on rows with at least one
allowed key) with small tiles so that short sequences still cross many blocks; the GPU (Triton) lowering is checked
for an abstract H100 without a GPU (interpret mode hides lowering errors). Run:
    python -m pytest -q tests/test_dmattn_kernel.py
"""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstract_gpu import abstract_h100
from pallas_kernels.dmattn import DmattnConfig, default_config, dynamic_mask_attention_pallas, prepare_mask, supports
from pallas_kernels.dmattn.prepass import key_expiry
from pallas_kernels.dmattn.reference import dynamic_mask_attention_reference, keep_threshold
from wmjax.config import DogeConfig
from wmjax.models.doge import DogeForCausalLM, init_params
from wmjax.ops.dmattn import dynamic_mask_attention

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

# small tiles: every kernel path (lists, overflow fallback, diagonal, regrouped dk/dv, ragged tail) at L ~ 100
SMALL = DmattnConfig(block_q=32, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16, block_k_dkv=16,
                     expiry_block_j=16, expiry_block_x=32, list_chunk=32, dkv_group=64, interpret=True)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(b, length, h, g, d, dtype, seed, ties=False):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, length, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, length, g, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, length, g, d), jnp.float32).astype(dtype)
    # Doge's bias: exp(A * softplus(dt)), distinct values (A != 0); `ties` quantizes it to a few levels
    dt = jax.random.normal(ks[3], (b, g, length), jnp.float32)
    bias = jnp.exp(-0.7 * jax.nn.softplus(dt))
    if ties:
        bias = jnp.round(bias * 4.0) / 4.0
    do = jax.random.normal(ks[4], (b, length, h, d), jnp.float32).astype(dtype)
    return q, k, v, bias, do


def _packed(b, length, doc_lens):
    """segment ids 1, 2, ... per document (contiguous runs) and per-document positions, as train/data.py packs."""
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for r in range(b):
        i, sid = 0, 1
        lens = list(doc_lens[r % len(doc_lens)])
        while i < length:
            n = min(lens.pop(0) if lens else length, length - i)
            seg[r, i:i + n] = sid
            pos[r, i:i + n] = np.arange(n)
            i, sid = i + n, sid + 1
    return jnp.asarray(seg), jnp.asarray(pos)


def _run_pair(b, length, h, g, d, w, *, dtype=jnp.float32, left_pad=(), seed=0, ties=False, cfg=SMALL, docs=None):
    q, k, v, bias, do = _inputs(b, length, h, g, d, dtype, seed, ties)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    seg = None
    if docs is not None:
        seg, pos = _packed(b, length, docs)
    key_mask = None
    if left_pad:
        npad = jnp.array(list(left_pad) + [0] * (b - len(left_pad)), jnp.int32)
        key_mask = jnp.arange(length)[None, :] >= npad[:, None]
    kw = dict(keep_window_size=w, query_positions=pos, key_positions=pos, key_mask=key_mask,
              query_segment_ids=seg, key_segment_ids=seg)
    # rows with no allowed key (left padding): the kernel outputs zeros, the reference the uniform average;
    # compare only rows with an allowed key, and give the others no cotangent
    has_key = jnp.ones((b, length), bool) if key_mask is None else (jnp.cumsum(key_mask, axis=1) > 0)
    do = jnp.where(has_key[:, :, None, None], do, 0).astype(do.dtype)
    assert supports(q, k, v, bias, **kw)

    def both(fn):
        def f(q, k, v, bias):
            out, vjp = jax.vjp(lambda *a: fn(*a, **kw), q, k, v, bias)
            return out, vjp(do)
        return jax.jit(f)(q, k, v, bias)

    got = both(lambda *a, **k_: dynamic_mask_attention_pallas(*a, **k_, config=cfg))
    want = both(dynamic_mask_attention_reference)
    m = np.asarray(has_key)[:, :, None, None]
    errs = {"out": _rel(np.where(m, got[0], 0), np.where(m, want[0], 0))}
    for name, a, e in zip(("dq", "dk", "dv", "dbias"), got[1], want[1]):
        errs[name] = _rel(a, e)
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
    return errs


CASES = [
    # (b, L, h, g, d, w, left_pad, ties): L above w (sparse path), w not a multiple of 16, ragged L, GQA 2
    pytest.param(2, 100, 4, 2, 64, 40, (0, 9), False, id="L100_w40_gqa2_d64_pad_ragged"),
    # L <= w: fast path (no pre-pass), GQA 1, head_dim 128
    pytest.param(1, 64, 2, 2, 128, 100, (), False, id="L64_w100_fastpath_gqa1_d128"),
    # GQA 4, head_dim 128, L far above w, ragged
    pytest.param(1, 120, 4, 1, 128, 24, (), False, id="L120_w24_gqa4_d128_ragged"),
    # many tied biases: every row keeps all keys tied at tau; lists overflow -> dense fallback
    pytest.param(2, 96, 2, 1, 64, 24, (5,), True, id="L96_w24_ties_overflow_pad"),
]


@pytest.mark.parametrize("b,length,h,g,d,w,left_pad,ties", CASES)
def test_matches_reference_f32(b, length, h, g, d, w, left_pad, ties):
    errs = _run_pair(b, length, h, g, d, w, left_pad=left_pad, ties=ties)
    assert all(e <= 1e-4 for e in errs.values()), errs


@pytest.mark.parametrize("w", [30, 200])
def test_packed_documents_segment_ids(w):
    """Packed training batches: segment ids (contiguous documents) and per-document positions; top-k per document
    (w=30: sparse path; w=200 >= L: fast path), GQA 2, ragged L."""
    errs = _run_pair(2, 90, 4, 2, 64, w, docs=[(20, 45, 25), (60, 10)], seed=11)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_dense_gpu_default_tiles_f32():
    """L <= w with the GPU's dense-mode defaults (fwd 128x64, dq and dk/dv 64x64) in interpret mode: packed documents
    (expired key blocks skipped, masked and unmasked tiles) plus left padding, ragged L, GQA 2."""
    cfg = dataclasses.replace(default_config(64, jnp.float32, dense=True), interpret=True)
    assert cfg.block_q != cfg.block_q_dq  # the metadata is built per kernel's tiles
    errs = _run_pair(2, 330, 4, 2, 64, 400, left_pad=(0, 5), docs=[(70, 150, 110), (200, 130)], cfg=cfg, seed=13)
    assert all(e <= 1e-4 for e in errs.values()), errs


def test_bf16_close_to_reference():
    errs = _run_pair(1, 80, 2, 1, 64, 30, dtype=jnp.bfloat16, seed=3)
    assert all(e <= 3e-2 for e in errs.values()), errs


@pytest.mark.slow
def test_matches_reference_gpu_tiles_f32():
    """GPU default tile sizes (128/64) in interpret mode, L = 700 > w = 300 (ragged, GQA 2)."""
    cfg = DmattnConfig(interpret=True)
    errs = _run_pair(1, 700, 2, 1, 64, 300, left_pad=(3,), cfg=cfg, seed=5)
    assert all(e <= 1e-4 for e in errs.values()), errs


def _expiry_bruteforce(bias, valid, w):
    """e_j from the dense definition: rows i >= j keep j iff fewer than w valid k <= i have bias_k > bias_j."""
    length = bias.shape[0]
    e = np.arange(length)
    for j in range(length):
        if not valid[j]:
            continue
        larger = valid & (bias > bias[j])
        cnt = np.cumsum(larger)
        rows = [i for i in range(j, length) if cnt[i] < w]
        e[j] = (max(rows) + 1) if rows else j
    return e


@pytest.mark.parametrize("ties", [False, True])
def test_key_expiry_prepass(ties):
    rng = np.random.default_rng(1)
    length, w = 96, 20
    bias = rng.random((2, length)).astype(np.float32)
    if ties:
        bias = np.round(bias * 5) / 5
    valid = np.ones((2, length), bool)
    valid[1, :7] = False
    valid[1, 50:53] = False
    e = key_expiry(jnp.where(valid, bias, -jnp.inf), jnp.asarray(valid), w, SMALL)
    for r in range(2):
        np.testing.assert_array_equal(np.asarray(e[r]), _expiry_bruteforce(bias[r], valid[r], w))


def test_kept_set_equals_reference_top_k():
    """rows [j, e_j) reproduce the reference's kept set bias_j >= tau_i (distinct and tied biases)."""
    rng = np.random.default_rng(2)
    length, w = 64, 10
    prep = jax.jit(lambda bias: prepare_mask(bias, jnp.ones((1, length), bool), w, SMALL))
    for bias in (rng.random((1, 1, length)), np.round(rng.random((1, 1, length)) * 3) / 3):
        bias = jnp.asarray(bias, jnp.float32)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None]
        tau = keep_threshold(bias, allowed[:, None], w)                                 # [1, 1, L]
        kept = allowed[:, None] & (bias[:, :, None, :] >= tau[..., None])
        aux = prep(bias)
        i = np.arange(length)[:, None]
        j = np.arange(length)[None, :]
        mine = (j <= i) & (i < np.asarray(aux["e"])[0, 0][None, :])
        np.testing.assert_array_equal(mine, np.asarray(kept)[0, 0])


def test_supports_subset():
    b, length, h, g, d = 1, 32, 4, 2, 64
    q = jnp.zeros((b, length, h, d))
    k = jnp.zeros((b, length, g, d))
    bias = jnp.zeros((b, g, length))
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    kw = dict(keep_window_size=8, query_positions=pos, key_positions=pos)
    assert supports(q, k, k, bias, **kw)
    assert not supports(q, k, k, bias, **{**kw, "sliding_window": 4})
    seg = jnp.broadcast_to((jnp.arange(length) >= 10).astype(jnp.int32), (b, length))
    assert supports(q, k, k, bias, **kw, query_segment_ids=seg, key_segment_ids=seg)  # packed documents
    seg_split = jnp.broadcast_to((jnp.arange(length) % 8 >= 4).astype(jnp.int32), (b, length))
    assert not supports(q, k, k, bias, **kw, query_segment_ids=seg_split, key_segment_ids=seg_split)  # 0,1,0,...
    assert not supports(q, k, k, bias, **{**kw, "key_positions": pos + 1})  # not self-attention by position
    assert not supports(q[:, :1], k, k, bias, **{**kw, "query_positions": pos[:, :1]})  # decode
    assert not supports(q, k, k, jnp.zeros((b, h, length)), **kw)  # per-query-head bias, h != g
    assert not supports(jnp.zeros((b, length, h, 96)), jnp.zeros((b, length, g, 96)), jnp.zeros((b, length, g, 96)),
                        bias, **kw)


def test_dispatcher_uses_kernel():
    """dynamic_mask_attention(implementation="pallas") reaches the kernel (a pallas_call in its jaxpr, none in the
    auto choice's on a CPU) and runs it (interpret mode on a CPU backend)."""
    b, length, h, g, d, w = 1, 48, 2, 1, 64, 20
    q, k, v, bias, _ = _inputs(b, length, h, g, d, jnp.float32, 7)
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    kw = dict(keep_window_size=w, query_positions=pos, key_positions=pos)
    jaxpr = lambda impl: str(jax.make_jaxpr(
        lambda *a: dynamic_mask_attention(*a, **kw, implementation=impl))(q, k, v, bias))
    assert "pallas_call" in jaxpr("pallas") and "pallas_call" not in jaxpr(None)
    got = dynamic_mask_attention(q, k, v, bias, **kw, implementation="pallas")
    want = dynamic_mask_attention_reference(q, k, v, bias, **kw)
    assert _rel(got, want) <= 1e-4


# ----------------------------------------------------------------------------- GPU lowering (abstract H100, no GPU)

def _lower_cuda(fn, *shapes):
    with abstract_h100():
        return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",))


def _shapes(b, length, h, g, d, dtype):
    s = jax.ShapeDtypeStruct
    return (s((b, length, h, d), dtype), s((b, length, g, d), dtype), s((b, length, g, d), dtype),
            s((b, g, length), jnp.float32), s((b, length), jnp.int32), s((b, length), jnp.bool_))


def _fwd_and_grad(w):
    def fwd(q, k, v, bias, pos, km):
        return dynamic_mask_attention_pallas(q, k, v, bias, keep_window_size=w, query_positions=pos,
                                             key_positions=pos, key_mask=km)

    def grad(q, k, v, bias, pos, km):
        f = lambda *a: jnp.sum(fwd(*a, pos, km).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)

    return fwd, grad


@pytest.mark.parametrize("length,w,d,dtype", [
    (4096, 2048, 128, jnp.bfloat16),   # Doge-160M heads, sparse path
    (2048, 2048, 128, jnp.bfloat16),   # L = w: fast path (no pre-pass)
    (1000, 300, 64, jnp.float32),      # ragged, f32 (IEEE dots)
    (1024, 200, 256, jnp.bfloat16),    # head_dim 256
    (512, 128, 64, jnp.float16),       # f16
])
def test_lowers_for_h100_triton(length, w, d, dtype):
    fwd, grad = _fwd_and_grad(w)
    shapes = _shapes(2, length, 6, 3, d, dtype)
    n_fwd = _lower_cuda(fwd, *shapes).as_text().count("__gpu$xla.gpu.triton")
    n_bwd = _lower_cuda(grad, *shapes).as_text().count("__gpu$xla.gpu.triton")
    sparse = w < length
    cfg = default_config(d, dtype)
    n_lists = len({cfg.block_q, cfg.block_q_dq})
    assert n_fwd == (2 + n_lists if sparse else 1), n_fwd  # expiry, lists (one per query-block size), fwd
    assert n_bwd == n_fwd + 2, n_bwd  # + dq, dkv (the forward runs once, inside the vjp)


def test_lowers_for_h100_triton_packed_segments():
    """Segment ids take the segmented key-expiry kernel; it must lower too."""
    w = 512

    def grad(q, k, v, bias, pos, km, seg):
        f = lambda *a: jnp.sum(dynamic_mask_attention_pallas(
            *a, keep_window_size=w, query_positions=pos, key_positions=pos, key_mask=km, query_segment_ids=seg,
            key_segment_ids=seg).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)

    shapes = _shapes(2, 2048, 6, 3, 128, jnp.bfloat16) + (jax.ShapeDtypeStruct((2, 2048), jnp.int32),)
    assert _lower_cuda(grad, *shapes).as_text().count("__gpu$xla.gpu.triton") >= 5  # expiry, lists, fwd, dq, dkv


_TENSOR = re.compile(r"tensor<((?:\d+x)+)(\w+)>")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4, "i1": 1, "i8": 1, "ui32": 4, "i64": 8, "f64": 8}


def test_l32768_memory_is_linear():
    """Lower fwd+bwd for the GPU at L = 32768 (b1, Doge-160M heads, w = 2048) and read every array the program
    holds in HBM from the StableHLO (all kernel operands and results, and every XLA intermediate; kernel-internal
    state lives in registers/SMEM). XLA cannot compile a CUDA module on a CPU-only jaxlib, so there is no
    compiled memory analysis here; bench/dmattn.py prints it on the GPU. The largest array must be a small
    multiple of one [L, H, D] activation and far below one [L, L] f32 array (4 GiB)."""
    length, w, d = 32768, 2048, 128
    fwd, grad = _fwd_and_grad(w)
    shapes = _shapes(1, length, 6, 3, d, jnp.bfloat16)
    txt = _lower_cuda(grad, *shapes).as_text()
    sizes = []
    for dims, dt in _TENSOR.findall(txt):
        n = int(np.prod([int(x) for x in dims.rstrip("x").split("x")]))
        sizes.append(n * _BYTES.get(dt, 4))
    biggest = max(sizes)
    activation = length * 6 * d * 2  # one bf16 [L, H, D] (q, o, do, dq): 48 MiB
    ll = length * length * 4
    assert biggest <= 2 * activation, (biggest, activation)
    assert biggest < ll / 32, (biggest, ll)
    # and nothing in the module scales like L^2: the same program at L/2 has its biggest array halved or less
    txt_half = _lower_cuda(grad, *_shapes(1, length // 2, 6, 3, d, jnp.bfloat16)).as_text()
    half = max(int(np.prod([int(x) for x in dims.rstrip("x").split("x")])) * _BYTES.get(dt, 4)
               for dims, dt in _TENSOR.findall(txt_half))
    assert biggest <= 2.01 * half, (biggest, half)


def test_doge_model_with_kernel_matches_reference():
    """Model level: a small Doge (GQA 2, head_dim 16, w = 12 < L) on packed documents gives the same logits and
    parameter gradients (A and dt_proj included, through d_bias) with the kernel as with the reference."""
    cfg = DogeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, keep_window_size=12,
                     tie_word_embeddings=True)
    params = init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    for name, layer in params["model"].items():  # A = 0 would tie every bias; draw it non-zero
        if name.startswith("layers_"):
            a = layer["self_attn"]["A"]
            layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=a.shape), a.dtype)
    length = 40
    ids = jnp.asarray(rng.integers(0, 101, (1, length)))
    seg, pos = _packed(1, length, [(15, 25)])
    wts = jnp.asarray(rng.normal(size=(1, length, 101)), jnp.float32)

    def run(impl):
        model = DogeForCausalLM(cfg, attention_impl=impl)

        def loss(p):
            logits, _ = model.apply({"params": p}, ids, positions=pos, segment_ids=seg)
            return jnp.sum(logits * wts), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    logits_k, grads_k = run("pallas")
    logits_r, grads_r = run("reference")
    assert _rel(logits_k, logits_r) <= 1e-4
    flat_k = jax.tree_util.tree_leaves_with_path(grads_k)
    flat_r = dict(jax.tree_util.tree_leaves_with_path(grads_r))
    for path, g in flat_k:
        assert _rel(g, flat_r[path]) <= 1e-4, (jax.tree_util.keystr(path), _rel(g, flat_r[path]))
    a_grad = grads_k["model"]["layers_0"]["self_attn"]["A"]
    assert float(jnp.max(jnp.abs(a_grad))) > 0  # the bias gradient reaches A


@pytest.mark.slow
def test_l32768_compiled_temp_memory_is_linear():
    """XLA's compiled memory analysis of the same fwd+bwd program, compiled for the CPU (Pallas interpret mode, the
    only way to compile it without a GPU): temp memory doubles with L (8k -> 32k: x4) and at L = 32768 stays far
    below one [L, L] f32 array. (On the H100, bench/dmattn.py measured temp 2.3 MiB for the GPU program.)"""
    def temp_bytes(length):
        s = jax.ShapeDtypeStruct
        shapes = (s((1, length, 6, 128), jnp.bfloat16), s((1, length, 3, 128), jnp.bfloat16),
                  s((1, length, 3, 128), jnp.bfloat16), s((1, 3, length), jnp.float32), s((1, length), jnp.int32))

        def grad(q, k, v, bias, pos):
            f = lambda *a: jnp.sum(dynamic_mask_attention_pallas(
                *a, keep_window_size=2048, query_positions=pos, key_positions=pos, interpret=True).astype(jnp.float32))
            return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)

        return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    t8, t32 = temp_bytes(8192), temp_bytes(32768)
    assert t32 <= 4.2 * t8, (t8, t32)  # linear in L (quadratic would be x16)
    assert t32 < 32768 * 32768 * 4 / 4, t32  # measured 514 MiB vs 4096 MiB for one [L, L] f32
