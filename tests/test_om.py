"""Om LLM (ARCformer): parity with the PyTorch reference written from the spec (tests/reference/om_torch.py),
the segment recurrence and its cache, left padding, bounded inference memory, gradients through the recurrence,
config and state-dict layout (main and heavyball)."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference.om_torch import OmLLMRef
from wmjax.config import ConfigError
from wmjax.configs.om import OmConfig
from wmjax.convert.layout_om import IGNORED_KEY_PATTERNS, export_problem, import_hook, layout, matches
import wmjax.models as models
from wmjax.models import om
from wmjax.sampling import generate

L, S = 8, 2
BASE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            dims_key=(16, 8), dims_value=(16, 8), attn_proj_rank=8, segment_len=L, state_len=S, ngram_sizes=(2, 3),
            scaling_factors=(0.2, 0.3), pad_token_id=60)
MAIN = OmConfig(**BASE, rope="om_compat")
# standard RoPE, a dv -> r projection, the 1-2-2-1 MLP, relu, scale 1/sqrt(dk), no 3-gram
VARIANT = OmConfig(**dict(BASE, attn_proj_rank=4, mlp_1221=True, hidden_act="relu", scaling_factors=None,
                          ngram_sizes=(2,), intermediate_size=40), rope="standard")
HEAVY = OmConfig(**BASE, rope="standard", qkv_norm=True, attn_norm=False, state_norm=False, mlp_norm="rmsnorm",
                 mlp_bias=False, end_attends_start=False, zero_pad_embeddings=True)
CONFIGS = {"main": MAIN, "variant": VARIANT, "heavyball": HEAVY}
T_OUT = 3 * L + 5  # 3 full segments + a partial one


# ------------------------------------------------------------------------------------------------ helpers
def _to_params(cfg, sd):
    """upstream state dict (numpy) -> wmjax params, through the layout."""
    params = {}
    for e in layout(cfg):
        a = np.asarray(sd[e.hf_key], np.float32)
        assert a.shape == e.hf_shape, (e.hf_key, a.shape, e.hf_shape)
        node = params
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = jnp.asarray(a.T if e.transpose else a)
    return params


def _to_state_dict(cfg, params):
    sd = {}
    for e in layout(cfg):
        a = params
        for k in e.path:
            a = a[k]
        a = np.asarray(a)
        sd[e.hf_key] = a.T if e.transpose else a
    return sd


_REFS = {}


def _ref(name):
    """(torch reference, converted params) per config, built once (torch init is fast; jax init compiles)."""
    if name not in _REFS:
        cfg = CONFIGS[name]
        torch.manual_seed(0)
        ref = OmLLMRef(cfg).eval()
        sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
        _REFS[name] = (ref, _to_params(cfg, sd))
    return _REFS[name]


def _tokens(seed, b, t, cfg=MAIN):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size - 1, (b, t)).astype(np.int32)


_APPLY = {}


def _apply(cfg, params, ids, cache=None, attention_mask=None, ngram_scope="segment"):
    key = (cfg, ngram_scope, cache is None, attention_mask is None)
    if key not in _APPLY:
        model = om.OmForCausalLM(cfg, ngram_scope=ngram_scope)
        _APPLY[key] = jax.jit(lambda p, x, c, m: model.apply({"params": p}, x, cache=c, attention_mask=m))
    return _APPLY[key](params, jnp.asarray(ids), cache, attention_mask)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", ["main", "variant", "heavyball"])
def test_logits_match_torch_reference(name):
    cfg = CONFIGS[name]
    ref, params = _ref(name)
    d = cfg.context_len
    ids = _tokens(1, 2, T_OUT, cfg)
    ids[0, 3] = cfg.pad_token_id  # a pad token inside the text (heavyball zeroes its embedding)
    raw = np.concatenate([np.full((2, d), cfg.pad_token_id, np.int32), ids], axis=1)
    with torch.no_grad():
        want, want_states = ref(torch.from_numpy(raw).long())
    # from the start (the model prepends d pad tokens); main also with a cache: the states after the 3 complete
    # segments (the partial one does not advance them)
    got, _ = _apply(cfg, params, ids)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)
    if name == "main":
        got_c, cache = _apply(cfg, params, ids, cache=om.init_cache(cfg, 2))
        np.testing.assert_allclose(np.asarray(got_c), want.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(cache["states"]), np.stack([s.numpy() for s in want_states]),
                                   atol=1e-4, rtol=1e-4)
        assert cache["segments"].tolist() == [3, 3] and cache["count"].tolist() == [5, 5]


def test_arbitrary_context_tokens_match_reference():
    """Upstream's first d raw tokens are context only: the same with any tokens there (set in the cache)."""
    cfg = MAIN
    ref, params = _ref("main")
    raw = _tokens(2, 2, cfg.context_len + 2 * L + 3)
    with torch.no_grad():
        want, _ = ref(torch.from_numpy(raw).long())
    cache = dict(om.init_cache(cfg, 2), context=jnp.asarray(raw[:, :cfg.context_len]))
    got, _ = _apply(cfg, params, raw[:, cfg.context_len:], cache=cache)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)


def test_gradients_match_torch_through_the_recurrence():
    """Training loss over every segment; gradients flow through the state recurrence (all layers' init_state
    get a gradient from the later segments) and equal torch autograd's."""
    cfg = MAIN
    ref, params = _ref("main")
    d = cfg.context_len
    ids = _tokens(3, 2, 3 * L + 1)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    model = om.OmForCausalLM(cfg)

    def loss(p):
        logits, _ = model.apply({"params": p}, jnp.asarray(inp))
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(tgt)[..., None], -1))

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    raw = np.concatenate([np.full((2, d), cfg.pad_token_id, np.int32), inp], axis=1)
    ref.zero_grad()
    logits, _ = ref(torch.from_numpy(raw).long())
    tl = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(tgt).long().reshape(-1))
    tl.backward()
    assert abs(float(val) - tl.item()) < 1e-5
    tg = {k: v.grad.numpy() for k, v in ref.named_parameters() if v.grad is not None}
    g_sd = _to_state_dict(cfg, grads)
    assert set(g_sd) == set(tg)
    for k, g in g_sd.items():
        scale = max(np.abs(tg[k]).max(), 1e-6)
        assert np.abs(g - tg[k]).max() <= 1e-4 * scale + 1e-7, k
    for l in range(cfg.num_hidden_layers):
        assert np.abs(g_sd[f"layers.{l}.attn.init_state"]).max() > 0


# ------------------------------------------------------------------------------------------------ recurrence / cache
def test_one_call_equals_segment_by_segment_calls():
    """The original's own equivalence: segment-by-segment calls with the saved state (+ the last d tokens, kept
    in the cache) = one call over the whole sequence; also chunks that split segments."""
    cfg = MAIN
    _, params = _ref("main")
    ids = _tokens(4, 2, T_OUT)
    whole, whole_cache = _apply(cfg, params, ids, cache=om.init_cache(cfg, 2))
    for sizes in ([L, L, L, 5], [5, L, L, L]):  # whole segments; chunks that straddle the segment boundaries
        cache, outs, a = om.init_cache(cfg, 2), [], 0
        for n in sizes:
            out, cache = _apply(cfg, params, ids[:, a:a + n], cache=cache)
            outs.append(np.asarray(out))
            a += n
        np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(whole), atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(cache, whole_cache, atol=1e-5, rtol=1e-5)


def test_partial_segment_never_advances_the_cache():
    cfg, d = MAIN, MAIN.context_len
    _, params = _ref("main")
    ids = _tokens(5, 2, 2 * L)
    _, c1 = _apply(cfg, params, ids[:, :L], cache=om.init_cache(cfg, 2))
    _, c2 = _apply(cfg, params, ids[:, L:L + 5], cache=c1)
    np.testing.assert_array_equal(np.asarray(c2["states"]), np.asarray(c1["states"]))
    assert c2["count"].tolist() == [5, 5] and c2["segments"].tolist() == [1, 1]
    np.testing.assert_array_equal(np.asarray(c2["context"]), ids[:, L - d:L])
    np.testing.assert_array_equal(np.asarray(c2["tokens"][:, :5]), ids[:, L:L + 5])
    c = c2
    for t in range(L + 5, 2 * L):
        _, c = _apply(cfg, params, ids[:, t:t + 1], cache=c)
        if t < 2 * L - 1:
            np.testing.assert_array_equal(np.asarray(c["states"]), np.asarray(c1["states"]))
    assert c["count"].tolist() == [0, 0] and c["segments"].tolist() == [2, 2]
    np.testing.assert_array_equal(np.asarray(c["context"]), ids[:, 2 * L - d:])
    assert np.abs(np.asarray(c["states"]) - np.asarray(c1["states"])).max() > 1e-3
    # the state the decode steps completed = the state of the segment fed at once
    _, c_seg = _apply(cfg, params, ids[:, L:], cache=c1)
    np.testing.assert_allclose(np.asarray(c["states"]), np.asarray(c_seg["states"]), atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_recomputation():
    """Prefill + one token at a time with the cache (greedy) = the logits of recomputing the whole sequence at
    every generated position, so greedy recomputation picks the same tokens."""
    cfg = MAIN
    _, params = _ref("main")
    prompt, new = _tokens(6, 2, 5), 2 * L + 3  # crosses two segment boundaries while decoding
    logits, cache = _apply(cfg, params, prompt, cache=om.init_cache(cfg, 2))
    c0 = om.init_cache(cfg, 2)  # decoding from an empty cache = prefill
    for t in range(prompt.shape[1]):
        out, c0 = _apply(cfg, params, prompt[:, t:t + 1], cache=c0)
        np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(logits[:, t]), atol=1e-5, rtol=1e-5)
    rest = lambda c: {k: v for k, v in c.items() if k != "kv"}
    chex.assert_trees_all_close(rest(c0), rest(cache), atol=1e-5, rtol=1e-5)
    rows = lambda c: jax.tree_util.tree_map(lambda t: t[:, :, :S + prompt.shape[1]], c["kv"])  # rows fed so far
    chex.assert_trees_all_close(rows(c0), rows(cache), atol=1e-5, rtol=1e-5)
    seq, steps = prompt, [np.asarray(logits[:, -1])]
    for _ in range(new):
        tok = steps[-1].argmax(-1).astype(np.int32)[:, None]
        seq = np.concatenate([seq, tok], axis=1)
        out, cache = _apply(cfg, params, tok, cache=cache)
        steps.append(np.asarray(out[:, -1]))
    full, _ = _apply(cfg, params, seq[:, :T_OUT])  # 5 + 24 = 29 tokens: the shape compiled above
    p = prompt.shape[1]
    np.testing.assert_allclose(np.stack(steps[:T_OUT - p + 1], 1), np.asarray(full[:, p - 1:]), atol=1e-5,
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(full[:, p - 1:-1]).argmax(-1), seq[:, p:T_OUT])


def test_generate_with_ragged_prompts_equals_recomputation():
    """wmjax.sampling.generate (left-padded ragged prompts, prefill + cached decode in a while loop): each row's
    greedy tokens = greedy recomputation of that row alone."""
    if "om" not in models.FAMILIES:  # until wmjax/models/__init__.py registers it
        models.register(om.FAMILY)
    cfg = MAIN
    _, params = _ref("main")
    prompts = [list(_tokens(9, 1, 5)[0]), list(_tokens(10, 1, 11)[0])]
    new = T_OUT - 11
    out = generate(om.OmForCausalLM(cfg), params, prompts, max_new_tokens=new, stop_tokens=[])
    for row, prompt in enumerate(prompts):
        seq = np.asarray(prompt + list(np.asarray(out.tokens[row])), np.int32)[None]
        seq = np.concatenate([seq, np.zeros((1, T_OUT + 6 - seq.shape[1]), np.int32)], 1)[:, :T_OUT]
        full, _ = _apply(cfg, params, np.repeat(seq, 2, 0))   # the [2, 29] shape compiled above
        p, n = len(prompt), len(prompt) + new
        np.testing.assert_array_equal(np.asarray(full[0, p - 1:n - 1]).argmax(-1), seq[0, p:n])


def test_left_padded_rows_equal_rows_alone():
    cfg, pad = MAIN, 6
    _, params = _ref("main")
    ids = _tokens(7, 2, T_OUT)
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    got, cache = _apply(cfg, params, ids, cache=om.init_cache(cfg, 2), attention_mask=jnp.asarray(mask))
    alone0, c0 = _apply(cfg, params, ids, cache=om.init_cache(cfg, 2))            # row 0 alone
    alone1, c1 = _apply(cfg, params, ids[:, pad:], cache=om.init_cache(cfg, 2))   # row 1 alone
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(alone0[0]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1, pad:]), np.asarray(alone1[1]), atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(got)))
    for k in ("states", "context", "tokens", "count", "segments"):
        row = (lambda a, r: a[:, r]) if k == "states" else (lambda a, r: a[r])
        np.testing.assert_allclose(row(np.asarray(cache[k]), 0), row(np.asarray(c0[k]), 0), atol=1e-5)
        np.testing.assert_allclose(row(np.asarray(cache[k]), 1), row(np.asarray(c1[k]), 1), atol=1e-5)
    # no cache: the mask alone gives the same logits
    got_nc, _ = _apply(cfg, params, ids, attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got_nc), np.asarray(got), atol=1e-6)


def test_ngram_scope_sequence_equals_segment():
    cfg = MAIN
    _, params = _ref("main")
    ids = _tokens(8, 2, T_OUT)
    a, _ = _apply(cfg, params, ids)
    b, _ = _apply(cfg, params, ids, ngram_scope="sequence")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_loss_and_gradients():
    """`OmForCausalLM(remat=True)` (what configs/om-300m.yaml trains with): every layer call passes all its
    arguments, so the remat's static arguments exist; loss and gradients equal the plain model's."""
    _, params = _ref("main")
    ids = jnp.asarray(_tokens(9, 2, T_OUT))

    def loss(remat, p):
        logits, _ = om.OmForCausalLM(MAIN, remat=remat).apply({"params": p}, ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(lambda p, r=r: loss(r, p)))(params) for r in (False, True))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    # f32; the recomputed forward fuses differently: per leaf, max error relative to the leaf's largest entry
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 2e-5 * np.abs(a).max() and np.abs(a).max() > 0


def test_inference_memory_is_bounded_in_length():
    """Compiled forward temporaries at 16 segments are within 1.5x of those at 4 (inference, no cache)."""
    cfg = MAIN.replace(segment_len=32, state_len=4)
    model = om.OmForCausalLM(cfg)
    shapes = jax.eval_shape(om._init_fn(cfg, jnp.float32), jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nn_unbox(shapes))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])

    def temp(n_seg):
        x = jax.ShapeDtypeStruct((2, n_seg * cfg.segment_len), jnp.int32)
        return fwd.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    t4, t16 = temp(4), temp(16)
    assert t16 <= 1.5 * t4, (t4, t16)


def nn_unbox(tree):
    return nn.meta.unbox(tree)


def test_segment_ids_are_refused():
    _, params = _ref("main")
    model = om.OmForCausalLM(MAIN)
    assert om.OmForCausalLM.accepts_segment_ids is False
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model.apply({"params": params}, ids, segment_ids=jnp.ones((1, 4), jnp.int32))


# ------------------------------------------------------------------------------------------------ layout / config
@pytest.mark.parametrize("name", ["main", "variant", "heavyball"])
def test_state_dict_layout_matches_reference_names(name):
    cfg = CONFIGS[name]
    ref, params = _ref(name)
    sd = ref.state_dict()
    assert sorted(e.hf_key for e in layout(cfg)) == sorted(sd)
    back = _to_state_dict(cfg, params)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v.numpy())
    # the wmjax param tree has exactly the layout's paths and shapes
    shapes = jax.eval_shape(om._init_fn(cfg, jnp.float32), jax.random.PRNGKey(0))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v.shape
            for path, v in jax.tree_util.tree_leaves_with_path(nn_unbox(shapes))}
    assert flat == {e.flat_path: e.flax_shape for e in layout(cfg)}
    assert jax.tree_util.tree_structure(om.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree_util.tree_structure(nn_unbox(shapes))


def test_tied_head_is_written_as_an_untied_copy():
    tied = MAIN.replace(tie_word_embeddings=True)
    shapes = nn_unbox(jax.eval_shape(om._init_fn(tied, jnp.float32), jax.random.PRNGKey(0)))
    assert "proj_out" not in shapes
    head = [e for e in layout(tied) if e.hf_key == "proj_out.weight"]
    assert len(head) == 1 and head[0].path == ("embedder", "embedding") and not head[0].transpose
    assert om.OmForCausalLM.lm_head_weight(tied, {"embedder": {"embedding": 1}}) == (1, "vd")


def test_ignored_upstream_rope_keys():
    key = "layers.0.attn.attn.attn_modules.1.position_embedder.thetas"
    assert any(p.search(key) for p in IGNORED_KEY_PATTERNS)
    assert not any(p.search("layers.0.attn.attn.attn_modules.1.proj_q.weights") for p in IGNORED_KEY_PATTERNS)
    refs = {key: 1, "embedder.weight": 2}
    assert import_hook(MAIN, refs)[1] == {"embedder.weight": 2}
    assert matches(MAIN.to_upstream_dict()) and matches({"dim_input": 8, "dims_key": [4]})
    assert not matches({"model_type": "doge"})
    assert export_problem(MAIN) is None and "mixed" in export_problem(MAIN.replace(qkv_norm=True))


@pytest.mark.parametrize("preset,count", [("om-300m", 298_403_840), ("om-300m-heavyball", 298_322_112)])
def test_published_parameter_counts(preset, count):
    cfg = OmConfig.preset(preset)
    assert sum(math.prod(e.hf_shape) for e in layout(cfg)) == count
    up = cfg.to_upstream_dict()
    assert OmConfig.from_upstream_dict(up) == cfg


def test_config_round_trips_and_errors():
    for cfg in CONFIGS.values():
        assert OmConfig.from_dict(cfg.to_dict()) == cfg
        if cfg.rope == "standard":
            with pytest.warns(UserWarning, match="rope='standard'"):
                up = cfg.to_upstream_dict()
        else:
            up = cfg.to_upstream_dict()
        assert OmConfig.from_upstream_dict(dict(up, dtype="float32")) == cfg
    assert MAIN.branch == "main" and HEAVY.branch == "heavyball"
    with pytest.raises(ConfigError, match="unknown OmConfig field"):
        OmConfig.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="scaling_factors"):
        MAIN.replace(dims_key=(16,), dims_value=(16,))
    with pytest.raises(ConfigError, match="hidden_act"):
        MAIN.replace(hidden_act="swiglu")
    with pytest.raises(ConfigError, match="ngram_sizes"):
        MAIN.replace(ngram_sizes=())
    with pytest.raises(ConfigError, match="diff_attn"):
        OmConfig.from_upstream_dict(dict(MAIN.to_upstream_dict(), diff_attn=True))
    main_json = {"num_layers": 8, "vocab_size": 50259, "dim_input": 1024, "dim_hidden": 4096,
                 "dims_key": [256, 128, 64], "dims_value": [256, 128, 64], "num_iters": [1, 1, 1], "num_heads": 8,
                 "activation": "gelu", "segment_len": 512, "state_len": 64, "cope": False,
                 "position_embedders": [{"dim": 256, "seq_len": 640, "num_dims": 4}] * 3,
                 "scaling_factors": [0.04419417, 0.08838835, 0.1767767], "dropout": 0.1, "diff_attn": False,
                 "attn_dropout": 0.1, "attn_logit_dropout": 0.0, "attn_proj_rank": 64, "init_ngrams": [2, 3],
                 "mlp_1221": False, "stacked_attn": True}
    cfg = OmConfig.from_upstream_dict(main_json)
    assert cfg.branch == "main" and cfg.rope == "om_compat" and cfg.num_hidden_layers == 8


def test_init_params_and_cache_shapes():
    small = MAIN.replace(num_hidden_layers=1, dims_key=(8,), dims_value=(8,), scaling_factors=None,
                         ngram_sizes=(2,))  # few random draws: XLA:CPU compiles each slowly
    p = om.init_params(small, jax.random.PRNGKey(0))
    assert np.std(np.asarray(p["layers_0"]["attn"]["init_state"])) > 1.3  # layer 0: std 1/sqrt(0.4)
    assert abs(np.std(np.asarray(p["embedder"]["embedding"])) - math.sqrt(0.4)) < 0.05
    cfg = MAIN
    c = om.init_cache(cfg, 3, 100, jnp.float32)
    assert c["states"].shape == (2, 3, S, 32) and c["context"].shape == (3, 2) and c["tokens"].shape == (3, L)
    assert np.all(np.asarray(c["context"]) == cfg.pad_token_id)
