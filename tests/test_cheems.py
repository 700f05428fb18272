"""Cheems (hybrid SSD + dynamic-mask attention + product-key CDMoE): parity with the PyTorch reference written from
the spec (tests/reference/cheems_torch.py) through the conversion layout, export/import, cached decoding, packed
documents, left padding, the SSD Pallas kernels (interpret mode), config translation and the family contract.
CPU, float32, tiny configs."""

import functools
import math
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from train.sharding import LOGICAL_RULES
from wmjax.config import ConfigError
from wmjax.configs.cheems import PRESETS, CheemsConfig
from wmjax.convert import core, families, layout_cheems
from wmjax.models import cheems as M

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.cheems_torch import CheemsForCausalLMTorch, randomize_  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, ssd_chunk_size=8,
            max_position_embeddings=64, ssd_a="raw")  # layers [ssd, attention]
MOE = dict(is_moe=True, num_cdmoe_experts=64, num_cdmoe_heads=2, num_cdmoe_experts_per_head=4,
           expert_retrieval_size=16)


# ---------------------------------------------------------------------------------------------------- helpers
def _flat(params, prefix=()):
    out = {}
    for k, v in params.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


def to_state_dict(cfg, params):
    """wmjax params -> upstream state dict (numpy) through the layout (what wmjax.convert does generically)."""
    flat = _flat(params)
    entries = layout_cheems.layout(cfg)
    assert sorted(e.path for e in entries) == sorted(flat), "layout and params name different tensors"
    return {e.hf_key: np.asarray(flat[e.path]).T if e.transpose else np.asarray(flat[e.path]) for e in entries}


def from_state_dict(cfg, sd):
    """upstream state dict -> wmjax params through the layout (tied lm_head dropped after checking it)."""
    sd = {k: np.asarray(v.detach().numpy() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    _, sd = layout_cheems.import_hook(cfg, sd)
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        np.testing.assert_array_equal(sd.pop("lm_head.weight"), sd["model.word_embed.weight"])
    entries = layout_cheems.layout(cfg)
    assert sorted(sd) == sorted(e.hf_key for e in entries)
    params = {}
    for e in entries:
        a = sd[e.hf_key]
        assert a.shape == e.hf_shape, (e.hf_key, a.shape, e.hf_shape)
        node = params
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = jnp.asarray(a.T if e.transpose else a)
    return params


def torch_model(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_(CheemsForCausalLMTorch(cfg).eval(), seed=seed, **kw)


def ids_batch(cfg, b, s, seed=1):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, (b, s)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _apply(cfg, ssd_impl="chunked"):
    """One jitted apply per (config, SSD implementation); keyword arrays ride along as a pytree argument."""
    model = M.CheemsForCausalLM(cfg, attention_impl="reference", ssd_impl=ssd_impl)
    return jax.jit(lambda p, ids, kw: model.apply({"params": p}, ids, **kw))


def forward(cfg, params, ids, ssd_impl="chunked", **kw):
    return np.asarray(_apply(cfg, ssd_impl)(params, jnp.asarray(ids), kw)[0])


def random_params(cfg, seed=0):
    """Params drawn straight from the layout (no init compile): no all-ones scale, non-zero CDMoE keys, kernels
    N(0, 1 / fan_in), SSD raw A in [-0.05, 0.05] (finite at these lengths), A_log N(0, 0.25), attention A N(0, 1)."""
    rng = np.random.default_rng(seed)
    params = {}
    for e in layout_cheems.layout(cfg):
        shape, name = e.flax_shape, e.path[-1]
        if e.path[-2:] == ("ssd", "A"):
            a = rng.uniform(-0.05, 0.05, shape)
        elif name == "A_log":
            a = 0.5 * rng.standard_normal(shape)
        elif name in ("A", "keys"):
            a = rng.standard_normal(shape)
        elif len(shape) == 1:
            a = 1 + 0.1 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / math.sqrt(shape[0] if e.transpose else shape[1])
        node = params
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[name] = jnp.asarray(a, jnp.float32)
    return params


# ---------------------------------------------------------------------------------------------------- parity
PARITY_CASES = {
    # name: (config overrides, randomize_ kwargs, batch, seq)   seq 13 is not a multiple of the SSD chunk 8
    "dense_raw_bias": (dict(hidden_bias=True), {}, 2, 13),
    "dense_raw_A_init_plus1_untied": (dict(tie_word_embeddings=False), dict(a_scale=None), 2, 13),
    "moe_raw_4_layers": (dict(MOE, num_hidden_layers=4), {}, 2, 13),
    "dense_negexp_dynamic_ntk": (dict(ssd_a="negative_exp", max_position_embeddings=8), {}, 2, 13),
    "moe_negexp_gqa1": (dict(MOE, ssd_a="negative_exp", num_key_value_heads=1), {}, 1, 21),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_torch_reference(case):
    overrides, rkw, b, s = PARITY_CASES[case]
    cfg = CheemsConfig(**dict(BASE, **overrides))
    ref_model = torch_model(cfg, **({k: v for k, v in rkw.items() if v is not None}))
    if rkw.get("a_scale", 0) is None:  # keep upstream's raw A = +1 (a growing state; finite at this length)
        with torch.no_grad():
            for name, p in ref_model.named_parameters():
                if name.endswith("ssd.A"):
                    p.fill_(1.0)
    ids = ids_batch(cfg, b, s)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids, dtype=torch.long)).numpy()
    assert np.isfinite(ref).all()
    params = from_state_dict(cfg, ref_model.state_dict())
    out = forward(cfg, params, ids)
    chex.assert_trees_all_close(out, ref, atol=TOL, rtol=0)
    # export goes back to exactly the same tensors, and the reference loads them (strict key set)
    sd = to_state_dict(cfg, params)
    ref_sd = {k: v for k, v in ref_model.state_dict().items()
              if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(sd) == sorted(ref_sd)
    for k in sd:
        np.testing.assert_array_equal(sd[k], ref_sd[k].numpy(), err_msg=k)


def test_export_import_exact_and_upstream_config_roundtrip():
    cfg = CheemsConfig(**dict(BASE, **MOE, ssd_a="negative_exp", hidden_bias=True))
    params = random_params(cfg)
    back = from_state_dict(cfg, to_state_dict(cfg, params))
    chex.assert_trees_all_equal(back, params)
    assert CheemsConfig.from_upstream_dict(cfg.to_upstream_dict()) == cfg
    raw = cfg.replace(ssd_a="raw")
    assert CheemsConfig.from_upstream_dict(raw.to_upstream_dict()) == raw
    # a negative_exp model exported for upstream code: raw A = -exp(A_log), the same function
    cfg_raw, params_raw = layout_cheems.as_raw_a(cfg, params)
    assert cfg_raw == raw
    ids = ids_batch(cfg, 2, 11)
    np.testing.assert_array_equal(forward(cfg_raw, params_raw, ids), forward(cfg, params, ids))
    back = from_state_dict(cfg_raw, to_state_dict(cfg_raw, params_raw))
    chex.assert_trees_all_equal(back, params_raw)


def test_wmjax_convert_generic_path():
    """Through wmjax.convert's family dispatch: the Cheems upstream record, the generic reader and writer."""
    assert families.UPSTREAMS["cheems"].layout is not None
    cfg = CheemsConfig(**dict(BASE, **MOE))
    params = random_params(cfg)
    sd = core.to_state_dict(cfg, params)
    assert sorted(sd) == sorted(to_state_dict(cfg, params))
    chex.assert_trees_all_equal(core.from_state_dict(cfg, sd), params)


# ---------------------------------------------------------------------------------------------------- decoding
DECODE_CFG = CheemsConfig(**dict(BASE, **MOE, attn_layer_offset=0))  # layers [attention, ssd]


def test_cached_decoding_matches_full_forward():
    """Prefill (the scan from a zero state) then one token at a time (ssd_step, KV cache) = the full forward."""
    cfg = DECODE_CFG
    params = random_params(cfg)
    b, s, prompt = 2, 10, 4
    ids = ids_batch(cfg, b, s, seed=3)
    full = forward(cfg, params, ids)
    step = _apply(cfg)
    cache = M.init_cache(cfg, b, s, jnp.float32)
    logits, cache = step(params, jnp.asarray(ids[:, :prompt]), dict(cache=cache))
    outs = [np.asarray(logits)]
    for t in range(prompt, s):
        logits, cache = step(params, jnp.asarray(ids[:, t:t + 1]), dict(cache=cache))
        outs.append(np.asarray(logits))
    assert int(cache["length"]) == s
    chex.assert_trees_all_close(np.concatenate(outs, axis=1), full, atol=1e-5, rtol=0)


def test_left_padded_prompt_matches_row_alone():
    """Pads (attention_mask 0) reach no attention and leave every SSD state alone, in prefill and decoding."""
    cfg = DECODE_CFG
    params = random_params(cfg, seed=1)
    apply = _apply(cfg)
    b, s, pad = 2, 10, 3
    ids = ids_batch(cfg, b, s, seed=5)
    mask = np.ones((b, s), np.int32)
    mask[1, :pad] = 0
    ids[1, :pad] = cfg.pad_token_id
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    cache = M.init_cache(cfg, b, s + 1, jnp.float32)
    kw = lambda c, m, p: dict(cache=c, attention_mask=jnp.asarray(m), positions=jnp.asarray(p))
    logits, cache = apply(params, jnp.asarray(ids), kw(cache, mask, pos))
    nxt = ids_batch(cfg, b, 1, seed=6)
    step, _ = apply(params, jnp.asarray(nxt), kw(cache, np.ones((b, 1), np.int32), pos[:, -1:] + 1))

    alone = forward(cfg, params, np.concatenate([ids[1:, pad:], nxt[1:]], axis=1))
    chex.assert_trees_all_close(np.asarray(logits)[1, pad:], alone[0, :-1], atol=1e-5, rtol=0)
    chex.assert_trees_all_close(np.asarray(step)[1, 0], alone[0, -1], atol=1e-5, rtol=0)


def test_packed_documents_behave_as_alone():
    """segment_ids + positions restarting per document: each document's logits as if it were alone (the alone
    runs: one row per document, right-padded, which cannot reach earlier tokens)."""
    cfg = CheemsConfig(**dict(BASE, num_hidden_layers=4))
    params = random_params(cfg)
    lengths = [5, 11, 4]  # boundaries inside chunks and across the chunk edges at 8 / 16
    ids = ids_batch(cfg, 1, sum(lengths), seed=7)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    packed = forward(cfg, params, ids, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
    starts = np.cumsum([0] + lengths[:-1])
    rows = np.full((len(lengths), max(lengths)), 5, np.int32)
    mask = np.zeros_like(rows)
    for r, (st, n) in enumerate(zip(starts, lengths)):
        rows[r, :n], mask[r, :n] = ids[0, st:st + n], 1
    alone = forward(cfg, params, rows, attention_mask=jnp.asarray(mask))
    for r, (st, n) in enumerate(zip(starts, lengths)):
        chex.assert_trees_all_close(packed[0, st:st + n], alone[r, :n], atol=1e-5, rtol=0)


def test_pallas_kernels_interpret_match_chunked_reference():
    """The model with the SSD Pallas kernels (interpret mode on CPU) equals the chunked jnp reference, also with
    packed documents; chunk 16, L = 40 (not a multiple of the chunk)."""
    cfg = CheemsConfig(**dict(BASE, num_hidden_layers=1, ssd_chunk_size=16, ssd_a="raw"))  # one SSD layer
    params = random_params(cfg)
    ids = ids_batch(cfg, 2, 40, seed=9)
    seg = np.repeat(np.array([[1] * 23 + [2] * 17]), 2, axis=0).astype(np.int32)
    for kw in ({}, dict(segment_ids=jnp.asarray(seg))):
        ref = forward(cfg, params, ids, ssd_impl="chunked", **kw)
        out = forward(cfg, params, ids, ssd_impl="pallas", **kw)
        chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=0)


def test_raw_a_at_init_overflows_and_negative_exp_does_not():
    """Upstream's raw A = +1 grows the state by ~exp(ln 2) per token at init: the exact recurrence overflows f32
    past ~128 tokens (docs/CHEEMS.md, the sign of A); A = -exp(A_log) (init -1) stays finite."""
    cfg = CheemsConfig(**dict(BASE, num_hidden_layers=1, ssd_chunk_size=32))  # one SSD layer, raw A
    params = random_params(cfg)
    ssd = params["model"]["layers_0"]["ssd"]
    ssd["A"] = jnp.ones_like(ssd["A"])                  # upstream's init
    ssd["dt_proj"]["kernel"] = 0.02 * ssd["dt_proj"]["kernel"]  # dt ~ softplus(0) = ln 2, as at init
    ids = ids_batch(cfg, 1, 160, seed=11)
    logits = forward(cfg, params, ids)
    assert np.isfinite(logits[:, :64]).all() and not np.isfinite(logits[:, -16:]).all()
    neg = cfg.replace(ssd_a="negative_exp")
    ssd["A_log"] = jnp.zeros_like(ssd.pop("A"))
    assert np.isfinite(forward(neg, params, ids)).all()


def test_gradients_through_remat_match_finite_differences():
    """A training-style loss through the remat'd layers: every gradient finite and equal to a central finite
    difference along a random direction (dense FFN: the CDMoE's top-k is piecewise, a finite step can switch
    experts)."""
    cfg = CheemsConfig(**dict(BASE, ssd_a="negative_exp"))
    params = random_params(cfg)
    ids = jnp.asarray(ids_batch(cfg, 2, 10))
    model = M.CheemsForCausalLM(cfg, remat=True, attention_impl="reference", ssd_impl="chunked")

    def loss(p):
        logits, _ = model.apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, g = value_and_grad(params)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(g))
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(0)
    v = jax.tree_util.tree_unflatten(tree, [jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in leaves])
    eps = 1e-3
    shift = lambda sgn: jax.tree_util.tree_map(lambda x, d: x + sgn * eps * d, params, v)
    fd = (float(value_and_grad(shift(1))[0]) - float(value_and_grad(shift(-1))[0])) / (2 * eps)
    dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v)))
    assert abs(fd - dot) <= 2e-2 * max(1.0, abs(dot)), (fd, dot)


def test_bfloat16_compute_close_to_float32():
    """bf16 compute (f32 params, f32 SSD state and dt): prefill + one cached step run and stay near f32."""
    cfg = DECODE_CFG
    params = random_params(cfg)
    model = M.CheemsForCausalLM(cfg, dtype=jnp.bfloat16, attention_impl="reference", ssd_impl="chunked")
    ids = ids_batch(cfg, 2, 9, seed=12)
    step = jax.jit(lambda p, i, c: model.apply({"params": p}, i, cache=c))
    cache = M.init_cache(cfg, 2, 9, jnp.bfloat16)
    logits, cache = step(params, jnp.asarray(ids[:, :8]), cache)
    last, cache = step(params, jnp.asarray(ids[:, 8:]), cache)
    assert cache["layers"][1].ssm_state.dtype == jnp.float32 and cache["layers"][0].key.dtype == jnp.bfloat16
    got = np.concatenate([np.asarray(logits), np.asarray(last)], axis=1)
    ref = forward(cfg, params, ids)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max() + 0.05, np.abs(got - ref).max()


# ---------------------------------------------------------------------------------------------------- structure
def test_params_layout_and_logical_axes():
    cfg = CheemsConfig(**dict(BASE, **MOE, hidden_bias=True, tie_word_embeddings=False))
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    flat = _flat(params)
    entries = layout_cheems.layout(cfg)
    assert {e.path: e.flax_shape for e in entries} == {k: v.shape for k, v in flat.items()}
    # upstream init: residuals / norms / raw SSD A 1, CDMoE keys 0, pad row 0; attention A = attn_a_init
    lay0, lay1 = params["model"]["layers_0"], params["model"]["layers_1"]
    assert set(lay0) >= {"ssd", "feed_forward"} and "attn" in lay1
    np.testing.assert_array_equal(lay1["attn"]["A"], cfg.attn_a_init)
    np.testing.assert_array_equal(lay0["ssd"]["A"], 1.0)
    np.testing.assert_array_equal(lay0["feed_forward"]["keys"], 0.0)
    np.testing.assert_array_equal(params["model"]["word_embed"]["embedding"][cfg.pad_token_id], 0.0)
    axes = M.param_logical_axes(cfg)
    known = {name for name, _ in LOGICAL_RULES}
    flat_axes = _flat(axes) if isinstance(axes, dict) else None
    assert set(flat_axes) == set(flat)
    for path, names in flat_axes.items():
        assert len(names) == flat[path].ndim, path
        assert all(n in known for n in names), (path, names)
    assert flat_axes[("model", "layers_0", "ssd", "c_proj", "kernel")] == ("embed", "heads")
    assert flat_axes[("model", "layers_0", "ssd", "A")] == ("heads",)
    assert flat_axes[("model", "word_embed", "embedding")] == ("vocab", "embed")
    # the cache: KV for attention layers, an f32 [b, H, P, P] state for SSD layers
    cache = M.init_cache(cfg, 2, 16)
    assert cache["layers"][0].ssm_state.shape == (2, 4, 16, 16) and cache["layers"][0].ssm_state.dtype == jnp.float32
    assert cache["layers"][1].key.shape == (2, 2, 16, 16)
    with pytest.raises(ConfigError, match="bounded"):
        M.init_cache(cfg, 2, 16, kind="bounded")
    assert M.FAMILY.name == "cheems" and M.FAMILY.config_cls is CheemsConfig
    assert "1 ssd, 1 attention" in M.describe(cfg)


def test_attention_a_init_default_zero_upstream_one():
    """Training stability (docs/CHEEMS.md): new training starts the dynamic-mask attention's A at 0 (flat key
    biases, as Doge); upstream's A = 1 made the biases e^softplus(dt) ~ 1e4 within ~20 steps at lr 4e-3, and
    the bf16-rounded dt then ties large biases exactly, blowing up the bf16 gradient. An upstream config.json
    (no attn_a_init) keeps upstream's init 1; the field round-trips through the upstream format."""
    assert CheemsConfig().attn_a_init == 0.0 and CheemsConfig.preset("Cheems-160M").attn_a_init == 0.0
    cfg = CheemsConfig(**dict(BASE, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1))
    for a in (0.0, 1.0):
        params = M.init_params(cfg.replace(attn_a_init=a), jax.random.PRNGKey(0))
        np.testing.assert_array_equal(params["model"]["layers_1"]["attn"]["A"], a)
    up = cfg.to_upstream_dict()
    assert CheemsConfig.from_upstream_dict(up) == cfg
    up.pop("attn_a_init")
    assert CheemsConfig.from_upstream_dict(up).attn_a_init == 1.0
    with pytest.raises(ConfigError, match="attn_a_init"):
        CheemsConfig(attn_a_init=float("nan"))


def test_config_validation_presets_and_upstream_names():
    cfg = CheemsConfig()
    assert cfg.layer_types.count("attention") == 4 and cfg.layer_types[7] == "attention"
    assert cfg.head_dim == 128 and cfg.ssd_a == "negative_exp"
    count = lambda c: sum(math.prod(e.hf_shape) for e in layout_cheems.layout(c))
    assert count(CheemsConfig.preset("Cheems-370M")) == 369_493_248       # spec 1.2 (instantiated upstream)
    assert count(CheemsConfig.preset("Cheems-1.5B-MoE")) == 1_450_304_768
    assert 150e6 < count(CheemsConfig.preset("Cheems-160M")) < 175e6
    assert set(PRESETS) == {"Cheems-370M", "Cheems-1.5B-MoE", "Cheems-160M"}
    with pytest.raises(ConfigError, match="ssd_a"):
        CheemsConfig(ssd_a="clamped")
    with pytest.raises(ConfigError, match="num_attention_heads"):
        CheemsConfig(hidden_size=100, num_attention_heads=8)
    with pytest.raises(ConfigError, match="dynamic_mask_ratio"):
        CheemsConfig(dynamic_mask_ratio=0.1)
    with pytest.raises(ConfigError, match="bogus"):
        CheemsConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="unknown Cheems preset"):
        CheemsConfig.preset("nope")
    assert CheemsConfig.from_dict(cfg.to_dict()) == cfg and cfg.replace(hidden_size=512).hidden_size == 512
    # upstream config.json: raw A, rope_scaling, the first version's double-m CDMoE names
    up = dict(cfg.to_upstream_dict(), rope_scaling=None, num_cdmmoe_experts=4096, num_cdmoe_experts=None)
    up.pop("num_cdmoe_experts")
    up.pop("ssd_a")
    got = CheemsConfig.from_upstream_dict(up)
    assert got.ssd_a == "raw" and got.rope_type == "default" and got.num_cdmoe_experts == 4096
    with pytest.raises(ConfigError, match="does not know"):
        CheemsConfig.from_upstream_dict(dict(up, something_new=1))
    assert layout_cheems.matches(cfg.to_upstream_dict())
    assert not layout_cheems.matches({"model_type": "cheems", "num_observation_layers": 12})
