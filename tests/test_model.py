"""Model-level properties of the Doge port (parity with transformers lives in test_doge_parity.py)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dmattn.reference import dynamic_mask_attention_reference
from wmjax.config import ConfigError, DogeConfig, PRESETS
from wmjax.models.doge import DogeForCausalLM, init_params, param_logical_axes

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, keep_window_size=5, tie_word_embeddings=True)


def _randomize_A(params, seed=0):
    """A = 0 makes every bias 1 (all ties); draw it non-zero so the top-k is well defined."""
    rng = np.random.default_rng(seed)
    for name, layer in params["model"].items():
        if name.startswith("layers_"):
            a = layer["self_attn"]["A"]
            layer["self_attn"]["A"] = jnp.asarray(rng.normal(size=a.shape), a.dtype)
    return params


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_valid_and_round_trip_hf_json(preset, tmp_path):
    cfg = DogeConfig.preset(preset)
    cfg.save_hf_json(str(tmp_path))
    assert DogeConfig.from_hf_json(str(tmp_path)) == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("head_dim", 7, "head_dim"),
    ("num_experts", 10, "num_experts"),
    ("router_layout", "sideways", "router_layout"),
    ("rope_type", "yarn", "rope_type"),
    ("vocab_size", 0, "vocab_size"),
])
def test_config_validation_names_the_field(field, value, needle):
    kwargs = dict(TINY, is_moe=True, num_experts=16, num_experts_per_tok=2)
    kwargs[field] = value
    with pytest.raises(ConfigError, match=needle):
        DogeConfig(**kwargs)


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="not_a_field"):
        DogeConfig.from_dict(dict(TINY, not_a_field=1))
    with pytest.raises(ConfigError, match="frobnicate"):
        DogeConfig.from_hf_dict(dict(DogeConfig(**TINY).to_hf_dict(), frobnicate=True))


@pytest.mark.parametrize("is_moe", [False, True])
def test_logical_axes_cover_every_param(is_moe):
    cfg = DogeConfig(**TINY, is_moe=is_moe, num_experts=16, num_experts_per_tok=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    axes = param_logical_axes(cfg)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)))
    assert len(flat_p) == len(flat_a)
    for path, leaf in flat_p:
        names = flat_a[path]
        assert len(names) == leaf.ndim and all(isinstance(n, str) for n in names), (path, names)


def test_packed_segments_equal_separate_documents():
    cfg = DogeConfig(**TINY)
    params = _randomize_A(init_params(cfg, jax.random.PRNGKey(1)))
    apply = jax.jit(DogeForCausalLM(cfg).apply)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 101, 7), rng.integers(0, 101, 9)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b]))[None]
    seg = jnp.asarray([0] * 7 + [1] * 9)[None]
    pos = jnp.asarray(list(range(7)) + list(range(9)))[None]
    out, _ = apply({"params": params}, packed, positions=pos, segment_ids=seg)
    ref_a, _ = apply({"params": params}, jnp.asarray(doc_a)[None])
    ref_b, _ = apply({"params": params}, jnp.asarray(doc_b)[None])
    chex.assert_trees_all_close(out[0, :7], ref_a[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out[0, 7:], ref_b[0], atol=1e-5, rtol=1e-5)


def test_per_token_router_is_tokenwise_and_hf_router_is_not():
    base = dict(TINY, is_moe=True, num_experts=16, num_experts_per_tok=3)
    x = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 101)
    for layout, tokenwise in (("per_token", True), ("hf", False)):
        cfg = DogeConfig(**base, router_layout=layout)
        params = init_params(cfg, jax.random.PRNGKey(3))
        apply = jax.jit(DogeForCausalLM(cfg).apply)
        full, _ = apply({"params": params}, x)
        row1, _ = apply({"params": params}, x[1:])
        same = np.allclose(full[1], row1[0], atol=1e-5)
        assert same == tokenwise, layout


def test_remat_and_bf16():
    cfg = DogeConfig(**TINY)
    params = init_params(cfg, jax.random.PRNGKey(4))
    x = jax.random.randint(jax.random.PRNGKey(5), (2, 8), 0, 101)
    loss = lambda m: (lambda p: m.apply({"params": p}, x)[0].mean())
    g0 = jax.jit(jax.grad(loss(DogeForCausalLM(cfg))))(params)
    g1 = jax.jit(jax.grad(loss(DogeForCausalLM(cfg, remat=True))))(params)
    chex.assert_trees_all_close(g0, g1, atol=1e-6)
    f32 = jax.jit(DogeForCausalLM(cfg).apply)({"params": params}, x)[0]
    bf16 = jax.jit(DogeForCausalLM(cfg, dtype=jnp.bfloat16).apply)({"params": params}, x)[0]
    assert bf16.dtype == jnp.float32  # logits are returned in f32
    # bf16 activations: ~3 significant digits per op, a few ops deep -> ~5e-2 absolute on O(1) logits
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=5e-2)


def test_dmattn_reference_topk_matches_bruteforce():
    """Each row keeps exactly the keep_window_size visible keys with the largest bias (distinct biases)."""
    rng = np.random.default_rng(6)
    b, s, h, g, d, w = 2, 11, 4, 2, 8, 4
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, s, h, d), (b, s, g, d), (b, s, g, d)))
    bias = jnp.asarray(rng.uniform(0.1, 2.0, size=(b, g, s)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    out = dynamic_mask_attention_reference(q, k, v, bias, keep_window_size=w, query_positions=pos,
                                           key_positions=pos)
    qn, kn, vn, bn = map(np.asarray, (q, k, v, bias))
    ref = np.zeros_like(qn)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for i in range(s):
                vis = np.arange(i + 1)
                keep = vis[np.argsort(-bn[bi, gi, vis])[:w]]
                sc = qn[bi, i, hi] @ kn[bi, keep, gi].T / np.sqrt(d) + bn[bi, gi, keep]
                p = np.exp(sc - sc.max()); p /= p.sum()
                ref[bi, i, hi] = p @ vn[bi, keep, gi]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_return_hidden_then_lm_head_is_the_logits(tied):
    cfg = DogeConfig(**dict(TINY, tie_word_embeddings=tied))
    params = init_params(cfg, jax.random.PRNGKey(6))
    x = jax.random.randint(jax.random.PRNGKey(7), (2, 8), 0, 101)
    model = DogeForCausalLM(cfg)
    logits, _ = model.apply({"params": params}, x)
    h, _ = model.apply({"params": params}, x, return_hidden=True)
    assert h.shape == (2, 8, cfg.hidden_size)
    w, layout = DogeForCausalLM.lm_head_weight(cfg, params)
    assert layout == ("vd" if tied else "dv")
    ref = h @ (w.T if layout == "vd" else w)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(logits), rtol=1e-5, atol=1e-5)


def _rotate_half_rope(x, cos, sin):
    """The HF formula: x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos[:, :, None] + jnp.concatenate([-x2, x1], axis=-1) * sin[:, :, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_rope_equals_rotate_half_formula_without_concatenate(dtype):
    from wmjax.layers.rope import apply_rope, rope_cos_sin

    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    cos, sin = rope_cos_sin(pos, 16, 10000.0, dtype=dtype)
    cos = cos + (0.01 * jax.random.normal(jax.random.PRNGKey(3), cos.shape)).astype(dtype)  # halves unequal too
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 3, 16)).astype(dtype)
    ct = jax.random.normal(jax.random.PRNGKey(1), x.shape).astype(dtype)
    out, vjp = jax.vjp(apply_rope, x, cos, sin)
    ref, ref_vjp = jax.vjp(_rotate_half_rope, x, cos, sin)
    chex.assert_trees_all_equal(out, ref)  # same products and sums per element
    chex.assert_trees_all_close(vjp(ct), ref_vjp(ct), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x, c, s, g: jax.vjp(apply_rope, x, c, s)[1](g))(x, cos, sin, ct))
    assert "concatenate" not in jaxpr and "rev" in jaxpr


def test_fused_dense_equals_separate_dense():
    import flax.linen as nn
    from wmjax.layers.linear import dense, fused_dense

    specs = [(12, ("embed", "q_heads"), "a"), (4, ("embed", "kv_heads"), "b"), (8, ("embed", "kv_heads"), "c")]

    class Fused(nn.Module):
        @nn.compact
        def __call__(self, x):
            return fused_dense(x, specs, use_bias=True, init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)

    class Separate(nn.Module):
        @nn.compact
        def __call__(self, x):
            return tuple(dense(f, axes, use_bias=True, init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32,
                               name=name)(x) for f, axes, name in specs)

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
    pf = Fused().init(jax.random.PRNGKey(1), x)
    ps = Separate().init(jax.random.PRNGKey(1), x)
    chex.assert_trees_all_equal(pf, ps)  # same names, shapes, logical axes, init values
    params = jax.tree_util.tree_map(lambda p: p + 0.1, nn.meta.unbox(pf))
    loss = lambda m, p, x: sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(m.apply(p, x)))
    chex.assert_trees_all_close(Fused().apply(params, x), Separate().apply(params, x), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.grad(lambda p, x: loss(Fused(), p, x), argnums=(0, 1))(params, x),
                                jax.grad(lambda p, x: loss(Separate(), p, x), argnums=(0, 1))(params, x),
                                rtol=1e-5, atol=1e-6)
    # the backward never concatenates the cotangents (one concatenate: the forward's kernels)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, x: loss(Fused(), p, x), argnums=(0, 1)))(params, x))
    assert jaxpr.count("concatenate") == 1, jaxpr.count("concatenate")


def test_scale_by_weight_sums_weight_gradient_in_f32():
    """The learnable norm / residual scales' gradient sums over every token: in bf16 compute it is summed in f32
    (tolerance: bf16 inputs, exact f32 products, f32 sum -> ~1e-6 relative to the f64 sum; the plain autodiff
    product sums in bf16 and is off by ~1e-2 at this size), and equals plain autodiff in f32."""
    from wmjax.layers.norm import scale_by_weight
    rng = np.random.default_rng(0)
    w = jnp.asarray(1 + 0.1 * rng.normal(size=64), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 512, 64)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(4, 512, 64)), jnp.bfloat16)
    exact = np.einsum("bsd,bsd->d", np.asarray(g, np.float64), np.asarray(x, np.float64))
    y, vjp = jax.vjp(lambda w, x: scale_by_weight(w, x, jnp.bfloat16), w, x)
    chex.assert_trees_all_equal(y, w.astype(jnp.bfloat16) * x)
    dw, dx = vjp(g)
    chex.assert_trees_all_equal(dx, g * w.astype(jnp.bfloat16))
    assert dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dw), exact, rtol=1e-5, atol=1e-4)
    # f32: the same value and gradients as autodiff of the plain product
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    got = jax.vjp(lambda w, x: scale_by_weight(w, x, jnp.float32), w, x32)[1](g32)
    want = jax.vjp(lambda w, x: w * x, w, x32)[1](g32)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_fast_random_compile_lowers_threefry_to_the_gpu_kernel():
    """init_params' random draws under `fast_random_compile`: lowered for CUDA (abstractly, on CPU), threefry is
    one FFI kernel call instead of the unrolled rounds; on CPU the values are unchanged (the option only touches
    the GPU lowering)."""
    from wmjax.random_init import fast_random_compile
    f = jax.jit(lambda k: jax.random.normal(k, (256, 64)))
    key = jax.random.PRNGKey(0)
    plain = f.trace(key).lower(lowering_platforms=("cuda",)).as_text()
    with fast_random_compile():
        fast = f.trace(key).lower(lowering_platforms=("cuda",)).as_text()
        on_cpu = jax.jit(lambda k: jax.random.normal(k, (256, 64)))(key)
    assert "threefry2x32_ffi" in fast and "threefry2x32_ffi" not in plain
    assert fast.count("stablehlo.xor") < plain.count("stablehlo.xor")
    chex.assert_trees_all_equal(on_cpu, f(key))


def test_dt_proj_runs_in_f32_so_large_key_biases_do_not_tie_in_bf16():
    """The dynamic-mask key bias exp(A softplus(dt)) with dt ~ 10 (A = 1, values close together): in f32 each query's
    softmax is one-hot on its largest-bias key and d loss / d W_dt nearly vanishes; with dt rounded to bf16 (spacing
    1/16 at 8-16) large biases tie exactly, the tied keys share p and the W_dt gradient is 2e-2 of the value
    projection's, the mechanism that diverged Cheems-160M's bf16 training (docs/CHEEMS.md, Training stability).
    dt_proj runs in f32 for any compute dtype: the ratio is ~2e-12 (the bound 1e-6 fails without it)."""
    import flax.linen as nn
    from wmjax.layers.attention import DynamicMaskAttention
    from wmjax.layers.rope import rope_cos_sin
    cfg = DogeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=32)
    b, s = 2, 256
    base = jax.random.normal(jax.random.PRNGKey(2), (64,))
    x = (base + 0.02 * jax.random.normal(jax.random.PRNGKey(0), (b, s, 64))).astype(jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = jnp.ones((b, s), bool)
    layer = DynamicMaskAttention(cfg, dtype=jnp.bfloat16, attention_impl="reference")
    cos, sin = rope_cos_sin(pos, 32, cfg.rope_theta, dtype=jnp.bfloat16)
    p = nn.unbox(layer.init(jax.random.PRNGKey(1), x, cos, sin, pos, mask)["params"])
    vb = base @ p["v_proj"]["kernel"]                      # the value of `base`: dt = 10 there, close to 10 around it
    p = {**p, "A": jnp.ones_like(p["A"]),
         "dt_proj": {"kernel": jnp.broadcast_to((10.0 * vb / jnp.sum(vb * vb))[:, None], p["dt_proj"]["kernel"].shape)}}

    def loss(p):
        out, _ = layer.apply({"params": p}, x, cos, sin, pos, mask)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    g = jax.grad(loss)(p)
    g_dt, g_v = (float(jnp.linalg.norm(g[k]["kernel"])) for k in ("dt_proj", "v_proj"))
    assert np.isfinite(g_dt) and g_v > 0
    assert g_dt < 1e-6 * g_v, (g_dt, g_v)
