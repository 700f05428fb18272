"""OTCE (issue 16): config, conversion through wmjax/convert/layout_otce.py, logit parity with the PyTorch reference
written from the spec (tests/reference/otce_torch.py), packed documents, cached decoding, left padding.

CPU f32. The torch models get O(1) weights (Linear / Conv ~ N(0, 1/fan_in), 1-D params perturbed) so that a
1e-4 logit tolerance is meaningful. Every wmjax forward goes through one jitted function (`_forward`), so the
shapes shared by several tests compile once.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wmjax.cache import KVCache, SSMCache
from wmjax.config import ConfigError
from wmjax.configs.otce import OTCEConfig
from wmjax.convert.layout import ConversionError
from wmjax.convert.layout_otce import layout, unique_params
from wmjax.layers.logn import logn_scale
from wmjax.layers.selective_mixer import causal_depthwise_conv, last_real_inputs
from wmjax.models.otce import FAMILY, OTCEForCausalLM, init_cache, init_params, param_logical_axes
from wmjax.sampling import positions_from_mask
from tests.reference.otce_torch import OTCEForCausalLMRef, load_balancing_loss
from train.sharding import LOGICAL_RULES

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-4
# spec §6.2's small config, narrower: blocks [ssm, ssm, attn, ssm, ssm, attn]; MoE in layers 1, 2, 3
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             mamba_d_state=8, num_observation_layers=2, num_thinking_layers=1, num_conseption_layers=2,
             num_expression_layers=1, num_experts=2, pad_token_id=0)


def small(**kw):
    return OTCEConfig(**dict(SMALL, **kw))


# ------------------------------------------------------------------------------------------------ helpers
def torch_model(cfg: OTCEConfig, seed=0):
    torch.manual_seed(seed)
    model = OTCEForCausalLMRef(cfg.to_upstream_dict()).eval()
    with torch.no_grad():
        seen = set()
        for name, p in model.named_parameters():  # named_parameters() yields a shared tensor once
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.copy_(torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / fan_in ** 0.5)
    return model


def import_params(cfg, sd):
    """Upstream state dict -> wmjax params through the layout: every alias of a shared tensor must agree."""
    flat, first = {}, {}
    for e in layout(cfg):
        a = sd[e.hf_key].detach().numpy() if hasattr(sd[e.hf_key], "detach") else np.asarray(sd[e.hf_key])
        assert tuple(a.shape) == e.hf_shape, e.hf_key
        a = a.T if e.transpose else a
        if e.flat_path in flat:
            if not np.array_equal(flat[e.flat_path], a):
                raise ConversionError(f"{e.hf_key} and {first[e.flat_path]} are copies of one tensor but differ")
            continue
        flat[e.flat_path], first[e.flat_path] = np.array(a), e.hf_key
    assert set(sd) - {"lm_head.weight"} <= {e.hf_key for e in layout(cfg)}
    params = {}
    for path, a in flat.items():
        node = params
        *head, last = path.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = jnp.asarray(a)
    return params


def export_params(cfg, params):
    """wmjax params -> upstream state dict (numpy), every alias written."""
    out = {}
    for e in layout(cfg):
        node = params
        for k in e.path:
            node = node[k]
        a = np.asarray(node)
        out[e.hf_key] = np.ascontiguousarray(a.T if e.transpose else a)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, ids, mask, positions, segment_ids):
    model = OTCEForCausalLM(cfg, attention_impl="reference")
    (logits, _), inter = model.apply({"params": params}, ids, positions=positions, attention_mask=mask,
                                     segment_ids=segment_ids, mutable=["intermediates"])
    aux = inter["intermediates"].get("router_aux_loss", (jnp.zeros(()),))[0]
    return logits, aux


@functools.partial(jax.jit, static_argnums=0)
def _step(cfg, params, ids, mask, positions, cache):
    model = OTCEForCausalLM(cfg, attention_impl="reference")
    return model.apply({"params": params}, ids, positions=positions, attention_mask=mask, cache=cache)


def torch_logits(model, ids):
    with torch.no_grad():
        logits, router = model(torch.as_tensor(np.asarray(ids), dtype=torch.long))
    return logits.numpy(), router


def tokens(shape, seed, vocab=64):
    return np.random.default_rng(seed).integers(1, vocab, size=shape).astype(np.int32)


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_and_stages():
    c = OTCEConfig()
    assert c.num_hidden_layers == 24 and c.dt_rank == 64 and c.is_moe
    assert c.layer_types == ("ssm",) * 12 + ("attention",) * 2 + ("ssm",) * 9 + ("attention",)
    assert [i for i, m in enumerate(c.moe_layers) if not m] == [0, 22, 23]  # spec §2.1: dense in 0, 22, 23
    s = OTCEConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, mamba_d_state=16, num_observation_layers=3, num_thinking_layers=1,
                   num_conseption_layers=2, num_expression_layers=1, num_experts=2)   # spec §6.2
    assert s.dt_rank == 4 and s.layer_types == ("ssm",) * 3 + ("attention", "ssm", "ssm", "attention")
    assert [i for i, m in enumerate(s.moe_layers) if m] == [1, 2, 3, 4]
    assert not any(small(num_experts=1).moe_layers)
    assert s.ssm_cache_shape(0) == (64, 1, 16, 4, 64)
    assert c.to_dict() == OTCEConfig.from_dict(c.to_dict()).to_dict()
    assert OTCEConfig.from_dict(dict(c.to_dict(), num_hidden_layers=24, is_moe=True)) == c
    assert OTCEConfig.from_upstream_dict(s.to_upstream_dict()) == s
    assert OTCEConfig.preset("OTCE-1B") == c and OTCEConfig.preset("OTCE-160M").num_hidden_layers == 18
    assert s.replace(num_thinking_layers=2).num_hidden_layers == 8


@pytest.mark.parametrize("bad, field", [
    (dict(num_hidden_layers=3), "num_hidden_layers"), (dict(expert_type="sum"), "expert_type"),
    (dict(mamba_dt_rank=0), "mamba_dt_rank"), (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"), (dict(bogus=1), "bogus"),
    (dict(sliding_window=64), "sliding_window"), (dict(num_observation_layers=-1), "num_observation_layers"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        OTCEConfig.from_dict(dict(SMALL, **bad))


def test_upstream_config_json_is_recognised():
    d = small().to_upstream_dict()
    assert d["model_type"] == "cheems" and d["mamba_dt_rank"] == 2
    with pytest.raises(ConfigError, match="num_observation_layers"):
        OTCEConfig.from_upstream_dict({"model_type": "cheems", "hidden_size": 64})  # a Cheems config
    with pytest.raises(ConfigError, match="does not know"):
        OTCEConfig.from_upstream_dict(dict(d, new_knob=1))
    with pytest.raises(ConfigError, match="private_expert_intermediate_size"):
        OTCEConfig.from_upstream_dict(dict(d, private_expert_intermediate_size=7))


def test_logn_scale():
    """max(1, ln(65 + i) / ln 4096): 1 up to position 4030, then growing (docs/OTCE.md, upstream bugs)."""
    got = np.asarray(logn_scale(jnp.asarray([0, 4030, 4031, 8192])))
    np.testing.assert_allclose(got, [1.0, 1.0, np.log(4096.0) / np.log(4096.0), np.log(8257.0) / np.log(4096.0)],
                               rtol=1e-6)
    assert got[3] > 1.08


# ------------------------------------------------------------------------------------------------ layers
def test_conv_segments_and_cache_helpers():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 1, 3)), jnp.float32)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    full = causal_depthwise_conv(x, w, segment_ids=seg)
    a = causal_depthwise_conv(x[:, :3], w)
    b = causal_depthwise_conv(x[:, 3:], w)
    chex.assert_trees_all_close(full[0, :3], a[0], atol=1e-6)
    chex.assert_trees_all_close(full[0, 3:], b[0], atol=1e-6)        # document 2 as if alone
    # conv cache: the last K-1 real inputs, pads (anywhere) skipped; a padded decode step keeps the cache
    prev = jnp.asarray(rng.normal(size=(1, 3, 3)), jnp.float32)
    new = last_real_inputs(prev, x[:1, :4], jnp.asarray([[True, False, True, False]]))
    chex.assert_trees_all_close(new, jnp.stack([prev[0, 2], x[0, 0], x[0, 2]])[None], atol=0)
    chex.assert_trees_all_close(last_real_inputs(prev, x[:1, :1], jnp.asarray([[False]])), prev, atol=0)
    # chunked conv with the cache = one conv
    c1 = causal_depthwise_conv(x[:, :5], w)
    c2 = causal_depthwise_conv(x[:, 5:], w, prev=last_real_inputs(jnp.zeros((2, 3, 3)), x[:, :5],
                                                                    jnp.ones((2, 5), bool)))
    chex.assert_trees_all_close(jnp.concatenate([c1, c2], 1), causal_depthwise_conv(x, w), atol=1e-6)


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("expert_type, counts", [("expansive", (190, 166)), ("cohesive", (150, 142)),
                                                 (None, (146, 146))])
def test_layout_matches_reference_state_dict(expert_type, counts):
    """Spec §6.2's config: the reference's state-dict keys / shapes (aliases included) are the layout's."""
    cfg = OTCEConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, mamba_d_state=16, num_observation_layers=3, num_thinking_layers=1,
                     num_conseption_layers=2, num_expression_layers=1, expert_type=expert_type, num_experts=2)
    sd = OTCEForCausalLMRef(cfg.to_upstream_dict()).state_dict()
    lay = layout(cfg)
    assert (len(lay), len(unique_params(cfg))) == counts
    assert {e.hf_key: e.hf_shape for e in lay} == {k: tuple(v.shape) for k, v in sd.items()}
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
            for k, v in jax.tree_util.tree_leaves_with_path(shapes)}
    assert flat == unique_params(cfg)


def test_export_import_exact_and_alias_check():
    cfg = small(mamba_conv_bias=True, mamba_proj_bias=True, hidden_bias=True, type_vocab_size=2)
    sd = torch_model(cfg).state_dict()
    params = import_params(cfg, sd)
    out = export_params(cfg, params)
    assert set(out) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k], v.numpy(), err_msg=k)
    chex.assert_trees_all_equal(import_params(cfg, out), params)
    bad = dict(out)
    key = "model.layers.1.feed_forward.experts.1.shared_up_proj.weight"
    bad[key] = bad[key] + 1.0
    with pytest.raises(ConversionError, match="differ"):
        import_params(cfg, bad)
    try:  # the generic converter, once the lead registers the family (wmjax.convert.families)
        from wmjax.convert import core, families
    except ImportError:  # pragma: no cover
        return
    if "otce" in families.UPSTREAMS:
        chex.assert_trees_all_equal(core.from_state_dict(cfg, sd), params)
        core_sd = core.to_state_dict(cfg, params)
        assert set(core_sd) == set(sd)


def test_family_record_and_init():
    cfg = small(num_observation_layers=1, num_conseption_layers=1)
    assert FAMILY.name == "otce" and FAMILY.config_cls is OTCEConfig and FAMILY.model_cls is OTCEForCausalLM
    params = init_params(cfg, jax.random.PRNGKey(0))
    emb = params["model"]["embed_tokens"]["word_embeddings"]["embedding"]
    assert float(jnp.abs(emb[0]).max()) == 0.0                     # pad row zeroed
    np.testing.assert_allclose(params["model"]["layers_0"]["mamba"]["A_log"][3],
                               np.log(np.arange(1, cfg.mamba_d_state + 1)), rtol=1e-6)
    axes = param_logical_axes(cfg)
    assert axes["model"]["layers_0"]["mamba"]["A_log"] == ("mamba_inner", "mamba_state")
    known = {name for name, _ in LOGICAL_RULES}
    used = {n for t in jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple)) for n in t}
    assert used <= known, used - known
    chex.assert_trees_all_equal_structs(jax.tree_util.tree_map(lambda x: 0, params),
                                        jax.tree_util.tree_map(lambda x: 0, axes,
                                                               is_leaf=lambda x: isinstance(x, tuple)))
    cache = init_cache(cfg, 2, 10)
    kinds = [type(c) for c in cache["layers"]]
    assert kinds == [SSMCache, KVCache, SSMCache, KVCache]
    assert cache["layers"][0].ssm_state.shape == (2, 32, 1, 8) and cache["layers"][0].conv_state.shape == (2, 3, 32)
    with pytest.raises(ValueError, match="bounded"):
        init_cache(cfg, 2, 10, kind="bounded")
    assert "OTCE" in FAMILY.describe(cfg)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("expert_type", ["expansive", "cohesive", None])
def test_logits_match_reference(expert_type):
    """b=2, L=13 (no multiple of any scan chunk); row 1 right-padded for the masked aux loss."""
    cfg = small(expert_type=expert_type)
    ref = torch_model(cfg)
    params = import_params(cfg, ref.state_dict())
    ids = tokens((2, 13), 1)
    mask = np.ones((2, 13), np.int32)
    mask[1, 10:] = 0
    pos = np.broadcast_to(np.arange(13, dtype=np.int32), (2, 13))
    logits, aux = _forward(cfg, params, ids, mask, pos, None)
    want, router = torch_logits(ref, ids)
    real = mask.astype(bool)  # right padding: the real tokens never see the pads (causal)
    np.testing.assert_allclose(np.asarray(logits)[real], want[real], atol=TOL, rtol=0)
    want_aux = load_balancing_loss(router, cfg.num_experts, cfg.num_experts_per_tok, torch.as_tensor(mask))
    np.testing.assert_allclose(float(aux), float(want_aux), atol=1e-5)
    if expert_type == "expansive":  # unmasked: the plain formula
        _, aux_all = _forward(cfg, params, ids, np.ones_like(mask), pos, None)
        np.testing.assert_allclose(float(aux_all), float(load_balancing_loss(router, 2, 1)), atol=1e-5)


def test_packed_documents_behave_as_if_alone():
    """Three documents (5, 9, 6 tokens) packed in one row: each one's logits are the reference's on it alone."""
    cfg = small()
    ref = torch_model(cfg, seed=1)
    params = import_params(cfg, ref.state_dict())
    lens = (5, 9, 6)
    docs = [tokens((1, n), 10 + i) for i, n in enumerate(lens)]
    ids = np.concatenate(docs, axis=1)
    seg = np.concatenate([np.full((1, n), i, np.int32) for i, n in enumerate(lens)], axis=1)
    pos = np.concatenate([np.arange(n, dtype=np.int32)[None] for n in lens], axis=1)
    logits, _ = _forward(cfg, params, ids, np.ones_like(ids), pos, seg)
    start = 0
    for doc in docs:
        n = doc.shape[1]
        np.testing.assert_allclose(np.asarray(logits)[0, start:start + n], torch_logits(ref, doc)[0][0],
                                   atol=TOL, rtol=0)
        start += n


def test_cached_decoding_left_padding():
    """Prefill a left-padded batch (row 1: 3 pads) into a cache, then decode 4 tokens one at a time: every real
    position's logits equal (a) wmjax's full forward of the padded sequence and (b) the reference on the row
    alone; the pads never touch the conv / SSM state."""
    cfg = small()
    ref = torch_model(cfg, seed=2)
    params = import_params(cfg, ref.state_dict())
    L, P, steps = 13, 9, 4
    ids = tokens((2, L), 3)
    mask = np.ones((2, L), np.int32)
    mask[1, :3] = 0
    ids[1, :3] = 0
    pos = np.asarray(positions_from_mask(jnp.asarray(mask)))
    full, _ = _forward(cfg, params, ids, mask, pos, None)

    cache = init_cache(cfg, 2, L)
    logits, cache = _step(cfg, params, ids[:, :P], mask[:, :P], pos[:, :P], cache)
    got = [logits]
    for t in range(P, P + steps):
        logits, cache = _step(cfg, params, ids[:, t:t + 1], mask[:, t:t + 1], pos[:, t:t + 1], cache)
        got.append(logits)
    got = np.concatenate([np.asarray(g) for g in got], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-5, rtol=0)
    for r in range(2):
        want = torch_logits(ref, ids[r:r + 1, real[r]])[0][0]
        np.testing.assert_allclose(got[r, real[r]], want, atol=TOL, rtol=0)
    assert int(cache["length"]) == L

    # a padded decode step (row 1 masked) leaves row 1's conv and SSM states exactly as they were
    _, after = _step(cfg, params, ids[:, :1], np.asarray([[1], [0]], np.int32), pos[:, -1:] + 1, cache)
    for old, new in zip(cache["layers"], after["layers"]):
        if isinstance(old, SSMCache):
            np.testing.assert_array_equal(np.asarray(new.ssm_state[1]), np.asarray(old.ssm_state[1]))
            np.testing.assert_array_equal(np.asarray(new.conv_state[1]), np.asarray(old.conv_state[1]))
            assert not np.array_equal(np.asarray(new.ssm_state[0]), np.asarray(old.ssm_state[0]))
