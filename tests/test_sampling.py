"""Cached decoding and `generate` (CPU, f32 unless said): prefill + step-by-step decode equal the full forward
pass, the bounded dynamic-mask cache equals the full cache, greedy output equals transformers' generate, the fused
decode kernels (Pallas interpret mode) inside generate give the model's tokens (f32, bf16), sampling draws only
tokens its filters allow (recomputed apart from generate), bad inputs fail clearly."""

import functools
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.decode.tuning import DecodeTuning
from wmjax.cache import BoundedKVCache, KVCache, cache_logical_axes, cache_nbytes, init_cache
from wmjax.config import DogeConfig
from wmjax.models.doge import DogeForCausalLM, init_params
from wmjax.sampling import SamplingParams, generate, positions_from_mask, process_logits

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=211, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, keep_window_size=6, tie_word_embeddings=True)
MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=3)


def _spread_bias(params, seed=0):
    """Draw A and dt_proj non-zero and O(1): at init (A = 0, dt_proj ~ N(0, 0.02)) every bias is ~equal, so the
    top-k would be decided by ties."""
    rng = np.random.default_rng(seed)
    for name, layer in params["model"].items():
        if name.startswith("layers_"):
            at = layer["self_attn"]
            at["A"] = jnp.asarray(rng.normal(size=at["A"].shape), jnp.float32)
            at["dt_proj"]["kernel"] = jnp.asarray(rng.normal(size=at["dt_proj"]["kernel"].shape), jnp.float32)
    return params


def _setup(**over):
    cfg = DogeConfig(**dict(TINY, **over))
    params = _spread_bias(init_params(cfg, jax.random.PRNGKey(1)))
    return cfg, params, DogeForCausalLM(cfg, attention_impl="reference")


def _distinct_rows(rng, lens, vocab):
    # distinct tokens: identical tokens have identical layer-0 values, hence tied biases (see test docstrings)
    return [rng.choice(vocab, n, replace=False).tolist() for n in lens]


def _padded(rows, total, side):
    ids = np.zeros((len(rows), total), np.int32)
    mask = np.zeros((len(rows), total), np.int32)
    for i, r in enumerate(rows):
        sl = slice(total - len(r), total) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, mask):
    return model.apply({"params": params}, ids, attention_mask=mask)[0]


def step_logits(model, params, prompts, tokens):
    """The logits [b, T, V] (f32 numpy) that generated token t of row i was chosen from, recomputed without
    `generate` (no cache, no decode step): one full forward pass over prompt_i + tokens_i, right-padded, read at
    the position before token t."""
    tokens = np.asarray(tokens)
    seqs = [list(p) + tokens[i].tolist() for i, p in enumerate(prompts)]
    full = np.asarray(_forward(model, params, *_padded(seqs, max(map(len, seqs)), "right")), np.float32)
    return np.stack([full[i, len(p) - 1:len(p) - 1 + tokens.shape[1]] for i, p in enumerate(prompts)])


def _runs_pallas(model, params, prompts, **kw):
    """Whether `generate`'s computation holds a pallas_call (the fused path's kernels), read from its jaxpr."""
    return "pallas_call" in str(jax.make_jaxpr(lambda p: generate(model, p, prompts, **kw).tokens)(params))


# MoE: HF's router layout ("hf") reads token m's expert keys from tokens m//2 and (N+m)//2 of the *flattened*
# batch (docs/DOGE.md, CDMoE router layout), so a token's routing depends on which other tokens are in the same
# call: a step-by-step decode (N = batch) cannot equal a full forward (N = batch * seq), even at batch 1. The
# per-token layout is exact, so the cache test runs MoE with router_layout="per_token"; the hf layout is checked
# against transformers' own cached generate below (batch 1, where both sides route the same token sets).
# (the cache lives in the attention layers, so MoE runs with the full cache only: the bounded one is covered by
# the dense and legacy-bias variants)
@pytest.mark.parametrize("variant,kind", [("dense", "full"), ("dense", "bounded"), ("moe_per_token", "full"),
                                          ("dense_legacy_query_bias", "bounded"), ("dense_sliding_window", "full")])
def test_prefill_then_decode_equals_full_forward(variant, kind):
    over = {"dense": {}, "moe_per_token": dict(MOE, router_layout="per_token"),
            "dense_legacy_query_bias": dict(dt_heads="query", qk_norm=False),
            "dense_sliding_window": dict(sliding_window=4)}[variant]
    cfg, params, model = _setup(**over)
    apply = jax.jit(model.apply)
    rng = np.random.default_rng(0)
    lens, steps = [5, 9, 3], 10  # ragged, prompt + decode >> keep_window_size = 6
    rows = _distinct_rows(rng, [n + steps for n in lens], cfg.vocab_size)
    # reference: full forward of every whole row, right-padded (positions 0.. per row, pads masked)
    fids, fmask = _padded(rows, max(lens) + steps, "right")
    refs = np.asarray(apply({"params": params}, fids, attention_mask=fmask)[0])
    for side in ("left", "right"):
        s = max(lens)
        pids, pmask = _padded([r[:n] for r, n in zip(rows, lens)], s, side)
        cache = init_cache(cfg, len(rows), s + steps, jnp.float32, kind)
        pos = positions_from_mask(pmask)
        logits, cache = apply({"params": params}, pids, positions=pos, cache=cache, attention_mask=pmask)
        for i, n in enumerate(lens):
            real = np.asarray(logits[i])[np.asarray(pmask[i]).astype(bool)]
            np.testing.assert_allclose(real, refs[i][:n], atol=1e-4, rtol=0)
        for t in range(steps):
            tok = jnp.asarray([r[n + t] for r, n in zip(rows, lens)])[:, None]
            p = jnp.asarray([n + t for n in lens])[:, None]
            logits, cache = apply({"params": params}, tok, positions=p, cache=cache)
            for i, n in enumerate(lens):
                np.testing.assert_allclose(np.asarray(logits[i, 0]), refs[i][n + t], atol=1e-4, rtol=0,
                                           err_msg=f"{side} row {i} step {t}")


def test_generate_logprobs_match_full_forward_ragged():
    cfg, params, model = _setup()
    rng = np.random.default_rng(1)
    prompts = _distinct_rows(rng, [4, 11, 7], cfg.vocab_size)
    apply = jax.jit(model.apply)
    for side in ("left", "right"):
        out = generate(model, params, prompts, max_new_tokens=12, padding_side=side, return_logprobs=True,
                       stop_tokens=[], cache="full")
        assert out.tokens.shape == (3, 12) and np.all(np.asarray(out.lengths) == 12)
        seqs = [p + np.asarray(out.tokens[i]).tolist() for i, p in enumerate(prompts)]
        fids, fmask = _padded(seqs, max(map(len, seqs)), "right")
        full = apply({"params": params}, fids, attention_mask=fmask)[0]
        for i, p in enumerate(prompts):
            lg = full[i, len(p) - 1:len(p) + 11]
            np.testing.assert_array_equal(np.argmax(np.asarray(lg), -1), np.asarray(out.tokens[i]))
            lp = np.asarray(jax.nn.log_softmax(lg))[np.arange(12), np.asarray(out.tokens[i])]
            np.testing.assert_allclose(np.asarray(out.logprobs[i]), lp, atol=1e-4)


def test_bounded_cache_same_tokens_as_full_cache_long():
    """L >> w: 200 tokens through w = 8 slots. A strong repetition penalty keeps the greedy path from repeating a
    token: a repeated token has the same layer-0 value, hence exactly the same bias as its earlier copy, and at
    the eviction boundary the full cache keeps every tied key while the bounded one keeps w (like HF's
    torch.topk, which keeps exactly w); such ties are the one documented difference."""
    cfg, params, model = _setup(keep_window_size=8, vocab_size=512)
    rng = np.random.default_rng(2)
    prompts = _distinct_rows(rng, [20, 13], cfg.vocab_size)
    kw = dict(max_new_tokens=180, repetition_penalty=1e4, return_logprobs=True, stop_tokens=[])
    full = generate(model, params, prompts, cache="full", **kw)
    bounded = generate(model, params, prompts, cache="bounded", **kw)
    assert len(set(np.asarray(full.tokens[0]).tolist())) == 180  # no repeated token, so no tie
    np.testing.assert_array_equal(np.asarray(full.tokens), np.asarray(bounded.tokens))
    np.testing.assert_allclose(np.asarray(full.logprobs), np.asarray(bounded.logprobs), atol=1e-4)
    # memory: the bounded cache does not depend on the generated length
    nb = lambda n, kind: cache_nbytes(jax.eval_shape(lambda: init_cache(cfg, 2, n, jnp.float32, kind)))
    assert nb(100, "bounded") == nb(100000, "bounded") < nb(200, "full")


def test_stop_tokens_per_row_and_streaming_callback():
    cfg, params, model = _setup()
    rng = np.random.default_rng(3)
    prompts = _distinct_rows(rng, [6, 6], cfg.vocab_size)
    free = generate(model, params, prompts, max_new_tokens=10, stop_tokens=[])
    t = np.asarray(free.tokens)
    # row 0 stops at its 3rd token, row 1 at its 6th (ids taken from the unconstrained run)
    stops = [[int(t[0, 2])], [int(t[1, 5]), 10**6 % cfg.vocab_size]]
    k0 = int(np.argmax(t[0] == t[0, 2])) + 1
    k1 = int(np.argmax(np.isin(t[1], stops[1]))) + 1
    seen = []
    out = generate(model, params, prompts, max_new_tokens=10, stop_tokens=stops, pad_id=0,
                   callback=lambda i, tok, active: seen.append((int(i), np.asarray(tok).copy(),
                                                                np.asarray(active).copy())))
    jax.block_until_ready(out.tokens)
    jax.effects_barrier()
    assert np.asarray(out.lengths).tolist() == [k0, k1]
    o = np.asarray(out.tokens)
    np.testing.assert_array_equal(o[0, :k0], t[0, :k0])
    np.testing.assert_array_equal(o[1, :k1], t[1, :k1])
    assert np.all(o[0, k0:] == 0) and np.all(o[1, k1:] == 0)
    seen.sort(key=lambda x: x[0])
    assert [s[0] for s in seen] == list(range(max(k0, k1)))
    streamed = np.stack([s[1] for s in seen], 1)
    active = np.stack([s[2] for s in seen], 1)
    np.testing.assert_array_equal(np.where(active, streamed, 0), o[:, :max(k0, k1)])


def test_logits_processors():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, -3.0]])
    seen = jnp.asarray([[True, False, False, True, False]])
    p = process_logits(logits, SamplingParams(repetition_penalty=2.0), seen)
    np.testing.assert_allclose(np.asarray(p), [[1.0, 1.0, 0.5, -2.0, -3.0]])
    p = process_logits(logits, SamplingParams(temperature=2.0, top_k=2))
    np.testing.assert_allclose(np.asarray(p), [[1.0, 0.5, -np.inf, -np.inf, -np.inf]])
    probs = np.asarray(jax.nn.softmax(logits[0]))  # ~ [.61, .22, .14, .03, .004]
    p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert np.isfinite(np.asarray(p)).sum() == 2  # .61 < .7 <= .61 + .22
    p = process_logits(logits, SamplingParams(temperature=1.0, min_p=0.2))
    assert np.isfinite(np.asarray(p)).tolist() == [[bool(x) for x in probs >= 0.2 * probs.max()]]
    # sampling with top_k=1 is greedy
    from wmjax.sampling import _choose
    lg = jax.random.normal(jax.random.PRNGKey(0), (4, 97))
    np.testing.assert_array_equal(_choose(lg, SamplingParams(temperature=1.3, top_k=1), None, jax.random.PRNGKey(1)),
                                  jnp.argmax(lg, -1))


def allowed_tokens(logits, temperature, top_k=0, top_p=1.0, min_p=0.0, slack=1e-4):
    """[V] bool: the tokens that sampling may draw from raw `logits` [V], worked out in float64 apart from
    wmjax.sampling.process_logits, in transformers' order: l = logits / temperature; the top_k largest (l at least
    the k-th largest); of those, each token whose strictly more likely tokens hold less than top_p of their
    renormalised mass; of those, each token with probability >= min_p x the largest (l >= max l + log min_p).
    `slack` widens each cut by that much in units of l (the decode step's f32 logits differ from a full forward
    pass's by ~1e-6)."""
    l = np.asarray(logits, np.float64) / temperature
    keep = np.ones(l.shape, bool)
    if top_k:
        keep &= l >= np.sort(l)[-top_k] - slack
    if top_p < 1.0:
        p = np.where(keep, np.exp(l - l.max()), 0.0)
        p /= p.sum()
        keep &= np.asarray([p[l > v + slack].sum() for v in l]) < top_p
    if min_p > 0.0:
        keep &= l >= l.max() + np.log(min_p) - slack
    return keep


# each filter alone, at a temperature where it keeps under a third of the 211 tokens (the logits' spread is ~0.5)
SAMPLERS = {"top_k": dict(temperature=1.5, top_k=5), "top_p": dict(temperature=0.3, top_p=0.5),
            "min_p": dict(temperature=0.3, min_p=0.2)}


@pytest.fixture(scope="module")
def spread_model():
    """The tiny model with every weight drawn O(0.3) (logits spread ~0.5, so the tokens vary); keep_window_size 64
    holds every token (a sampled sequence repeats tokens, whose tied key biases make the bounded cache's top-k
    differ from a full forward pass's)."""
    cfg, params, model = _setup(**FUSED)
    rng = np.random.default_rng(5)
    return cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params), model


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampling_reproducible_and_inside_allowed_set(name, spread_model):
    """temperature > 0 through generate with top-k, top-p or min-p (3 rows, 16 tokens): the same seed gives the
    same tokens, another seed other tokens, and every token is in `allowed_tokens` of the logits it was drawn from
    (recomputed by a full forward pass), a set of under a third of the vocabulary, so an unfiltered draw leaves it."""
    cfg, params, model = spread_model
    sp = SAMPLERS[name]
    prompts = _distinct_rows(np.random.default_rng(8), [5, 9, 3], cfg.vocab_size)
    kw = dict(max_new_tokens=16, stop_tokens=[], **sp)
    runs = [np.asarray(generate(model, params, prompts, rng=jax.random.PRNGKey(seed), **kw).tokens)
            for seed in (0, 0, 1)]
    np.testing.assert_array_equal(runs[1], runs[0])
    assert (runs[2] != runs[0]).mean() > 0.5, runs
    for tokens in runs[1:]:
        allowed = np.asarray([[allowed_tokens(l, **sp) for l in row]
                              for row in step_logits(model, params, prompts, tokens)])  # [b, T, V]
        assert allowed.mean() < 1 / 3, allowed.mean()
        inside = np.take_along_axis(allowed, tokens[..., None], -1)[..., 0]
        assert inside.all(), np.argwhere(~inside)


def test_bad_inputs_fail_clearly():
    cfg, params, model = _setup()
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, params, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, params, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, params, np.ones((2, 3), np.int32), attention_mask=np.asarray([[1, 1, 1], [0, 0, 0]]),
                 max_new_tokens=4)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generate(model, params, [[1, 2]], max_new_tokens=bad)
    with pytest.raises(ValueError, match="longer than the cache"):
        generate(model, params, [list(range(10))], max_new_tokens=4, cache="full", max_cache_length=8)
    with pytest.raises(ValueError, match="does not fit the cache"):
        generate(model, params, [list(range(6))], max_new_tokens=4, cache="full", max_cache_length=8)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, params, [[1, cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, params, [[1]], max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sliding window"):
        init_cache(cfg.replace(sliding_window=4), 1, 8, kind="bounded")


def test_cache_pytree_kinds_and_axes():
    cfg = DogeConfig(**TINY)
    full, bounded = init_cache(cfg, 2, 16), init_cache(cfg, 2, 16, kind="bounded")
    assert all(isinstance(l, KVCache) for l in full["layers"])
    assert all(isinstance(l, BoundedKVCache) for l in bounded["layers"])
    assert full["layers"][0]["key"].shape == (2, 2, 16, 8)
    assert init_cache(cfg, 2, 13, multiple_of=8)["layers"][0]["key"].shape == (2, 2, 16, 8)
    assert bounded["layers"][0]["key"].shape == (2, 2, cfg.keep_window_size, 8)
    for c in (full, bounded):
        axes = cache_logical_axes(c)
        for leaf, names in zip(jax.tree_util.tree_leaves(c),
                               jax.tree_util.tree_leaves(axes, is_leaf=_is_axes)):
            assert len(names) == leaf.ndim
    try:  # the training mesh rules place the cache like the activations (batch over data/fsdp, heads on tensor)
        from train.sharding import flax_rules, make_mesh
    except ImportError:  # pragma: no cover
        return
    from wmjax.cache import cache_shardings
    for c in (full, bounded):
        placed = jax.device_put(c, cache_shardings(c, make_mesh(), flax_rules()))
        assert type(placed["layers"][0]) is type(c["layers"][0])
    # on a data 2 x fsdp 1 x tensor 2 mesh (abstract: the shapes need no devices) each shard holds half the rows
    # and half the kv heads (full: key / value [b, G, C, D], bias [b, G, C]; bounded: [b, G, w, ...])
    mesh = jax.sharding.AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
    w = cfg.keep_window_size
    want = {"full": dict(key=(1, 1, 16, 8), value=(1, 1, 16, 8), key_bias=(1, 1, 16), key_position=(1, 16),
                         key_mask=(1, 16)),
            "bounded": dict(key=(1, 1, w, 8), value=(1, 1, w, 8), key_bias=(1, 1, w), key_position=(1, 1, w),
                            key_mask=(1, 1, w))}
    for kind, c in (("full", full), ("bounded", bounded)):
        shardings = cache_shardings(c, mesh, flax_rules())
        assert shardings["length"].shard_shape(()) == ()
        for lc, ls in zip(c["layers"], shardings["layers"]):
            got = {name: ls[name].shard_shape(lc[name].shape) for name in want[kind]}
            assert got == want[kind], (kind, got)


def _is_axes(x):
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def _hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf = transformers.DogeForCausalLM(transformers.DogeConfig(**cfg.to_hf_dict())).eval()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        for n, prm in hf.named_parameters():
            if n.endswith(".A") or "dt_proj" in n:
                prm.copy_(torch.randn_like(prm))
    return hf


def _from_hf(cfg, hf):
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    try:
        from wmjax.convert import from_state_dict
        return from_state_dict(cfg, sd)
    except ImportError:  # pragma: no cover - conversion not landed: the parity mapping of the foundation check
        p = {"model": {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
                       "norm": {"weight": sd["model.norm.weight"]}}}
        for i in range(cfg.num_hidden_layers):
            pre, layer = f"model.layers.{i}.", {}
            for k, v in sd.items():
                if not k.startswith(pre):
                    continue
                rest = k[len(pre):].split(".")
                if rest[-1] == "weight" and rest[-2].endswith("proj") or rest[-2:] == ["router_gate", "weight"]:
                    rest[-1], v = "kernel", v.T
                elif rest[-1] == "weight" and rest[-2].endswith("embed"):
                    rest = rest[:-1]
                d = layer
                for r in rest[:-1]:
                    d = d.setdefault(r, {})
                d[rest[-1]] = v
            p["model"][f"layers_{i}"] = layer
        return jax.tree_util.tree_map(jnp.asarray, p)


@pytest.mark.parametrize("variant", ["dense_batch", "moe_hf_batch1", "dense_batch_fused_decode"])
def test_greedy_equals_transformers_generate(variant):
    torch = pytest.importorskip("torch")
    # keep_window_size 8 < prompt + new: the model decode path with its per-step top-k; 64: the fused decode path
    # (its kernels in Pallas interpret mode)
    over = dict(vocab_size=512, keep_window_size=64 if variant.endswith("fused_decode") else 8)
    if variant == "moe_hf_batch1":
        over.update(MOE)
    cfg = DogeConfig(**dict(TINY, **over))
    hf = _hf_model(cfg)
    params = _from_hf(cfg, hf)
    model = DogeForCausalLM(cfg, attention_impl="reference")
    rng = np.random.default_rng(4)
    lens = [7, 12] if variant.startswith("dense_batch") else [10]
    prompts = _distinct_rows(rng, lens, cfg.vocab_size)
    new = 24
    ids, mask = _padded(prompts, max(lens), "left")  # HF generate wants left padding
    with torch.no_grad():
        ref = hf.generate(torch.tensor(np.asarray(ids), dtype=torch.long),
                          attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                          repetition_penalty=1.5)[:, ids.shape[1]:].numpy()
    decode = "fused" if variant.endswith("fused_decode") else "auto"
    kw = dict(max_new_tokens=new, stop_tokens=[], repetition_penalty=1.5, return_logprobs=True)
    out = generate(model, params, prompts, decode=decode, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    if decode == "fused":  # the kernels (f32) also give the model's decode step's tokens and logprobs
        by_model = generate(model, params, prompts, decode="model", **kw)
        np.testing.assert_array_equal(np.asarray(by_model.tokens), ref)
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(by_model.logprobs), atol=3e-5)


# ----------------------------------------------------------------------------- fused decode path (decode="fused")
FUSED = dict(keep_window_size=64)  # the fused path needs a full cache no longer than keep_window_size


# (the reference attention inside generate is covered by test_generate_fused_decode_equals_model_decode)
@pytest.mark.parametrize("variant,impl", [("dense", "interpret"), ("untied_biases_no_qk_norm", "reference"),
                                          ("dense_batch1", "interpret")])
def test_fused_decode_step_equals_model_decode_step(variant, impl):
    """prefill, then step by step through the model's decode step and through its fused backend (concatenated
    projections, the decode attention kernel in Pallas interpret mode or its reference) on the same cache.
    dense_batch1: one row (the projections' gemv form, the attention kernel prefetching the next weights; cache 200
    slots, padded to 256) under the tuned defaults and under other blocks / warps (`pallas_kernels.decode.tuning`:
    4 cache blocks of 64, 4 gemv warps)."""
    from wmjax.fused_decode import FusedParams, fused_decode_step, fused_decode_supported, prepare_decode_params
    from wmjax.sampling import decode_step, pad_prompts, prefill
    over = (dict(FUSED) if variant == "dense" else dict(keep_window_size=256) if variant == "dense_batch1" else
            dict(FUSED, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, qk_norm=False))
    cfg, params, model = _setup(**over)
    rng = np.random.default_rng(5)
    if variant != "dense":  # biases are zero at init: draw every param
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    lengths = [9] if variant == "dense_batch1" else [5, 9, 3]
    ids, mask = pad_prompts(_distinct_rows(rng, lengths, cfg.vocab_size))
    steps = 6
    cache_length = 200 if variant == "dense_batch1" else ids.shape[1] + steps
    assert fused_decode_supported(cfg, "full", cache_length)
    cache = init_cache(cfg, len(lengths), cache_length, jnp.float32, multiple_of=128)
    logits, pos, cache, _ = jax.jit(lambda c: prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), c))(cache)
    fparams = prepare_decode_params(cfg, params, jnp.float32)
    assert isinstance(fparams, FusedParams) and len(fparams.layers) == cfg.num_hidden_layers
    model_step = jax.jit(lambda c, t, p: decode_step(model, params, c, t, p))
    tunings = [None]
    if variant == "dense_batch1":
        tunings.append(DecodeTuning(cache_block=64, gemv_warps=4))
    tok0, pos0, cache0 = jnp.argmax(logits, -1).astype(jnp.int32), pos, cache
    for opts in tunings:
        state = cache0  # the model's cache after prefill, as it is
        fused_step = jax.jit(lambda s, t, p, o=opts: fused_decode_step(cfg, jnp.float32, fparams, s, t, p,
                                                                       implementation=impl, tuning=o))
        tok, pos, cache = tok0, pos0, cache0
        for t in range(steps):
            pos = pos + 1
            want, cache = model_step(cache, tok, pos)
            got, state = fused_step(state, tok, pos)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0,
                                       err_msg=f"step {t} {opts}")
            tok = jnp.argmax(want, -1).astype(jnp.int32)
        # both backends leave the same cache (same type, layout and contents)
        assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(cache)
        for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(cache)):
            np.testing.assert_allclose(np.asarray(got_leaf, np.float32), np.asarray(want_leaf, np.float32),
                                       atol=1e-5, rtol=0, err_msg=f"cache {opts}")


def test_decode_step_backends():
    """decode_step takes the backend "model" or "fused"; the fused one takes prepare_decode_params' FusedParams and
    a full cache whose capacity is a multiple of the attention kernel's block; anything else is refused by name."""
    from wmjax.fused_decode import prepare_decode_params
    from wmjax.sampling import decode_step
    cfg, params, model = _setup(**FUSED)
    tok = pos = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="backend='xla'"):
        decode_step(model, params, init_cache(cfg, 1, 8), tok, pos, backend="xla")
    with pytest.raises(TypeError, match="FusedParams"):
        decode_step(model, params, init_cache(cfg, 1, 8), tok, pos, backend="fused")
    fparams = prepare_decode_params(cfg, params, jnp.float32)
    with pytest.raises(ValueError, match=r"multiple_of=128"):
        decode_step(model, fparams, init_cache(cfg, 1, 8), tok, pos, backend="fused", tuning=DecodeTuning())


# bf16: the kernels' logits and the model step's differ by up to ~0.026 here (3 bf16 ulps at |logit| ~1.4,
# measured teacher-forced over 12 steps), so a greedy token may differ only where the model's two candidates are
# closer than twice that
_BF16_TIE = 0.06


@pytest.mark.slow
def test_generate_fused_kernels_bf16_equal_model_decode():
    """decode="fused" in bf16 runs the pallas_kernels.decode kernels inside generate (Pallas interpret mode on a
    CPU: a pallas_call in its jaxpr) with decode="model"'s greedy tokens: one row (the projections' gemv form), every
    weight drawn O(0.3) so the tokens vary; equal up to the first differing token, which must be a near tie
    (_BF16_TIE) under the model's logits; logprobs up to there to 5e-2 (a few bf16 roundings of logits ~2).
    f32 (3e-5 logprobs, tokens equal to transformers'): test_greedy_equals_transformers_generate[...fused_decode]."""
    cfg, params, _ = _setup(**FUSED)
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), params)
    model = DogeForCausalLM(cfg, dtype=jnp.bfloat16, attention_impl="reference")
    prompts = _distinct_rows(np.random.default_rng(6), [9], cfg.vocab_size)
    kw = dict(max_new_tokens=12, stop_tokens=[], cache="full")
    assert _runs_pallas(model, params, prompts, decode="fused", **kw)
    a = generate(model, params, prompts, decode="model", return_logprobs=True, **kw)
    b = generate(model, params, prompts, decode="fused", return_logprobs=True, **kw)
    ta, tb, la, lb = (np.asarray(x)[0] for x in (a.tokens, b.tokens, a.logprobs, b.logprobs))
    k = int(np.argmax(ta != tb)) if (ta != tb).any() else len(ta)
    if k < len(ta):  # the prefixes agree up to k, so the model's logits there judge both candidates
        lk = step_logits(model, params, prompts, a.tokens)[0, k]
        assert lk[ta[k]] - lk[tb[k]] < _BF16_TIE, (k, ta, tb, lk[ta[k]] - lk[tb[k]])
    assert k >= 3, (ta, tb)
    np.testing.assert_allclose(lb[:k], la[:k], atol=5e-2)


def test_generate_auto_decode_on_cpu_is_the_model_path():
    """decode="auto" on a CPU runs the model's decode step (the fused kernels are for the GPU); the benchmark-only
    options of earlier versions (compiler_options, fused_options, decode="fused_xla") are gone."""
    cfg, params, model = _setup(**FUSED)
    prompts = _distinct_rows(np.random.default_rng(7), [5, 9], cfg.vocab_size)
    kw = dict(max_new_tokens=6, stop_tokens=[], cache="full")
    a = generate(model, params, prompts, **kw)
    assert not _runs_pallas(model, params, prompts, **kw)
    # greedy: each token is the argmax of a full forward pass over its prefix
    np.testing.assert_array_equal(np.asarray(a.tokens), step_logits(model, params, prompts, a.tokens).argmax(-1))
    for gone in (dict(compiler_options={}), dict(fused_options=None)):
        with pytest.raises(TypeError):
            generate(model, params, prompts, **gone, **kw)
    with pytest.raises(ValueError, match="decode='fused_xla'"):
        generate(model, params, prompts, decode="fused_xla", **kw)


def test_fused_decode_applies_only_where_exact():
    from wmjax.fused_decode import fused_decode_supported
    cfg = DogeConfig(**dict(TINY, **FUSED))
    assert fused_decode_supported(cfg, "full", 64)
    assert not fused_decode_supported(cfg, "full", 65)  # longer than keep_window_size: per-step top-k needed
    assert not fused_decode_supported(cfg, "bounded", 32)
    assert not fused_decode_supported(cfg.replace(sliding_window=8), "full", 32)
    assert not fused_decode_supported(DogeConfig(**dict(TINY, **FUSED, **MOE)), "full", 32)
    assert not fused_decode_supported(cfg.replace(dt_heads="query", qk_norm=False), "full", 32)
    _, params, model = _setup()  # keep_window_size 6
    with pytest.raises(ValueError, match="decode='fused'"):
        generate(model, params, [[1, 2, 3]], max_new_tokens=8, decode="fused")
    with pytest.raises(ValueError, match="decode="):
        generate(model, params, [[1, 2, 3]], max_new_tokens=2, decode="fast")


# ----------------------------------------------------------------------------- prompt length, exported tokenizer
def test_prompt_past_max_position_embeddings_warns():
    """The warning comes before anything is compiled; per-row stop lists for the wrong number of rows (a ValueError
    raised after the length check) stop each call there, so no call compiles or reads the params."""
    cfg = DogeConfig(**dict(TINY, max_position_embeddings=16))
    model, params = DogeForCausalLM(cfg), None
    rng = np.random.default_rng(6)
    bad_stop = dict(stop_tokens=[[1], [2], [3]])
    with pytest.warns(UserWarning, match=r"a prompt of 18 tokens is longer than max_position_embeddings=16"):
        with pytest.raises(ValueError, match="per-row stop-token lists"):
            generate(model, params, _distinct_rows(rng, [18, 5], cfg.vocab_size), max_new_tokens=2, **bad_stop)
    with pytest.warns(UserWarning, match=r"a prompt of 12 tokens \+ max_new_tokens=5 = 17 is longer than "
                                         r"max_position_embeddings=16"):
        with pytest.raises(ValueError, match="per-row stop-token lists"):
            generate(model, params, _distinct_rows(rng, [12], cfg.vocab_size), max_new_tokens=5, **bad_stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 12 + 4 = 16 fits: no warning
        with pytest.raises(ValueError, match="per-row stop-token lists"):
            generate(model, params, _distinct_rows(rng, [12], cfg.vocab_size), max_new_tokens=4, **bad_stop)


def test_cli_samples_hf_export_with_its_tokenizer(sp_model, tmp_path, capsys):
    """`wmjax.sample --hf OUT` of an export written with a sentencepiece tokenizer: no --tokenizer needed, the
    prompt gets BOS, the text equals a direct generate's; a prompt past max_position_embeddings warns once, in one
    line on stderr."""
    from wmjax.convert import save_hf
    from wmjax.sample import main
    from wmjax.tokenizer import Tokenizer

    cfg, params, model = _setup(vocab_size=512, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                                max_position_embeddings=16)
    save_hf(cfg, params, tmp_path / "hf", tokenizer=sp_model)
    prompt = "def f(x):\n    return"
    sp = Tokenizer(sp_model)
    ids = [2] + sp.encode(prompt)
    assert main(["--hf", str(tmp_path / "hf"), "--prompt", prompt, "--max-new-tokens", "8", "--no-stream"]) == 0
    out, err = capsys.readouterr()
    with pytest.warns(UserWarning, match="max_position_embeddings=16"):  # the model the CLI runs on the CPU
        ref = generate(DogeForCausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32), params, [ids],
                       max_new_tokens=8)
    new = np.asarray(ref.tokens[0, :int(ref.lengths[0])]).tolist()
    assert out == prompt + sp.decode(ids + new)[len(sp.decode(ids)):] + "\n---\n"
    assert f"tokenizer {tmp_path / 'hf' / 'tokenizer.json'}" in err
    warned = [line for line in err.splitlines() if "max_position_embeddings" in line]
    assert warned == [f"warning: generate: a prompt of {len(ids)} tokens + max_new_tokens=8 = {len(ids) + 8} is "
                      "longer than max_position_embeddings=16; the model was not made for positions past it"], err
