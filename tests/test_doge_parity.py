"""Logit parity of wmjax's Doge with `transformers.DogeForCausalLM` (eager attention), CPU f32, through wmjax.convert.

Every case: a random HF model (A drawn N(0, 1) so the keep-window top-k has no ties; norms / residual scales
perturbed so a swapped mapping cannot hide behind all-ones weights), its state dict imported with
`wmjax.convert.load_hf`, the same batch through both, max |logit diff| <= 1e-4.
"""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from wmjax.config import DogeConfig
from wmjax.convert import ConversionError, load_hf, save_hf
from wmjax.models.doge import DogeForCausalLM

jax.config.update("jax_default_matmul_precision", "highest")
transformers.logging.set_verbosity_error()

TOL = 1e-4
W = 6  # keep_window_size
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, keep_window_size=W, max_position_embeddings=64)
MOE = dict(is_moe=True, num_experts=16, num_experts_per_tok=3)


def hf_model(cfg: DogeConfig, seed=0, hf_cfg=None):
    """Random HF Doge for `cfg` with A, dt_proj ~ N(0, 1) (at HF's init std 0.02 for dt_proj, the biases of a
    13-key row sit within ~1e-4 of each other and f32 rounding can flip the top-k) and every other 1-D weight
    perturbed around its init."""
    torch.manual_seed(seed)
    hf_cfg = hf_cfg or transformers.DogeConfig(**cfg.to_hf_dict())
    model = transformers.DogeForCausalLM(hf_cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A") or name.endswith("dt_proj.weight"):
                p.copy_(torch.randn_like(p))  # well-separated biases: no near-ties in the keep-window top-k
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b, s, seed=1, pad_row=None, pad_from=None):
    """Token ids without repeats inside a row: a repeated token has the same value vector in layer 0, hence exactly
    the same bias, and HF's torch.topk breaks such ties arbitrarily (wmjax keeps every tied key; dmattn.py)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(BASE["vocab_size"], generator=g)[:s] for _ in range(b)])
    mask = torch.ones(b, s, dtype=torch.long)
    if pad_row is not None:
        mask[pad_row, pad_from:] = 0  # right padding
    return ids, mask


def wmjax_forward(cfg, params, ids, mask, aux=False):
    model = DogeForCausalLM(cfg, attention_impl="reference")
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m, output_router_logits=aux,
                                             mutable=["intermediates"]))
    (logits, _), inter = fn(params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    aux_loss = inter.get("intermediates", {}).get("router_aux_loss")
    return np.asarray(logits), (None if aux_loss is None else float(np.asarray(aux_loss[0])))


def state_dict(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


DENSE_CASES = {
    # name: (config overrides, batch, seq, padded)
    "gqa2_long_padded_biases": (dict(attention_bias=True, mlp_bias=True), 3, 13, True),
    "gqa2_short": (dict(tie_word_embeddings=True), 2, 5, False),
    "gqa4_short": (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8), 2, 5, False),
    "gqa4_long_padded": (dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8), 3, 13, True),
    "mha_long_dynamic_rope": (dict(num_key_value_heads=4, rope_type="dynamic", rope_factor=4.0,
                                   max_position_embeddings=8), 2, 13, False),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_logits_match_hf(case):
    overrides, b, s, padded = DENSE_CASES[case]
    cfg = DogeConfig(**dict(BASE, **overrides))
    hf = hf_model(cfg)
    ids, mask = batch(b, s, pad_row=1 if padded else None, pad_from=s - 4)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.numpy()
    cfg2, params = load_hf(state_dict(hf), config=cfg)
    assert cfg2 == cfg
    out, _ = wmjax_forward(cfg, params, ids, mask)
    assert out.shape == ref.shape
    chex.assert_trees_all_close(out, ref, atol=TOL, rtol=0)
    if s > W:  # the keep-window top-k really fired: without it the logits differ
        assert np.abs(wmjax_forward(cfg.replace(keep_window_size=64), params, ids, mask)[0] - out).max() > 1e-3


class _PerTokenRouter(torch.nn.Module):
    """Wraps HF's router_gate so that HF's `.view(2, N, K)` yields the intended per-token split: token n's own
    logits [x-keys | y-keys]. Everything after the router (top-k, product keys, experts, aux loss) stays HF's."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        r = self.linear(x)
        b, s, two_k = r.shape
        k = two_k // 2
        lx, ly = r[..., :k].reshape(b * s, k), r[..., k:].reshape(b * s, k)
        return torch.cat([lx, ly], 0).reshape(b, s, two_k)


@pytest.mark.parametrize("layout", ["hf", "per_token"])
def test_moe_logits_and_aux_loss_match_hf(layout):
    cfg = DogeConfig(**dict(BASE, **MOE, router_layout=layout, tie_word_embeddings=True))
    hf = hf_model(cfg)
    sd = state_dict(hf)
    if layout == "per_token":
        for layer in hf.model.layers:
            layer.mlp.router_gate = _PerTokenRouter(layer.mlp.router_gate)
    ids, mask = batch(3, 13, pad_row=1, pad_from=9)
    with torch.no_grad():
        out_hf = hf(ids, attention_mask=mask, output_router_logits=True)
    _, params = load_hf(sd, config=cfg)
    out, aux = wmjax_forward(cfg, params, ids, mask, aux=True)
    chex.assert_trees_all_close(out, out_hf.logits.numpy(), atol=TOL, rtol=0)
    assert aux is not None and abs(aux - float(out_hf.aux_loss)) <= 1e-5 * max(1.0, abs(aux)), (aux, out_hf.aux_loss)
    # the two layouts really are different functions on this batch
    other = cfg.replace(router_layout="per_token" if layout == "hf" else "hf")
    assert np.abs(wmjax_forward(other, params, ids, mask)[0] - out).max() > 1e-3


def test_per_token_router_matches_numpy_recomputation():
    """Independent of HF: the per-token CDMoE output of one layer, recomputed in numpy (docs/DOGE.md, CDMoE)."""
    from wmjax.layers.moe import CDMoE

    cfg = DogeConfig(**dict(BASE, **MOE, router_layout="per_token"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, cfg.hidden_size)).astype(np.float32)
    mod = CDMoE(cfg)
    shapes = flax.linen.meta.unbox(jax.eval_shape(mod.init, jax.random.PRNGKey(0), jnp.asarray(x))["params"])
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(scale=0.3, size=a.shape).astype(np.float32)),
                                    shapes)
    out, _ = mod.apply({"params": params}, jnp.asarray(x))
    p = jax.tree_util.tree_map(np.asarray, params)
    silu = lambda z: z / (1 + np.exp(-z))
    xf = x.reshape(-1, cfg.hidden_size)
    dense = (silu(xf @ p["gate_proj"]["kernel"]) * (xf @ p["up_proj"]["kernel"])) @ p["down_proj"]["kernel"]
    K = cfg.num_keys
    ref = []
    for n, xn in enumerate(xf):
        r = xn @ p["router_gate"]["kernel"]
        scores = (r[:K][:, None] + r[K:][None, :]).reshape(-1)  # expert i*K + j
        top = np.argsort(-scores, kind="stable")[: cfg.num_experts_per_tok]
        w = np.exp(scores[top] - scores[top].max())
        w /= w.sum()
        ref.append(dense[n] + sum(silu(p["down_embed"][e] @ xn) * wt * p["up_embed"][e] for e, wt in zip(top, w)))
    chex.assert_trees_all_close(np.asarray(out).reshape(-1, cfg.hidden_size), np.stack(ref), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ legacy
_OLD_TOP = {"model.embed_tokens.weight": "model.word_embed.weight", "model.norm.weight": "model.final_layernorm.weight"}
_OLD_LAYER = [(".input_layernorm.weight", ".pre_layernorm.weight"), (".input_residual", ".pre_residual.weight"),
              (".post_attention_layernorm.weight", ".post_layernorm.weight"),
              (".post_attention_residual", ".post_residual.weight")]


def to_legacy_names(sd):
    """HF names -> the pre-2025-06-19 SmallDoge names (docs/DOGE.md, Legacy SmallDoge layouts; written out here,
    not taken from wmjax)."""
    out = {}
    for k, v in sd.items():
        k = _OLD_TOP.get(k, k)
        for new, old in _OLD_LAYER:
            if k.endswith(new):
                k = k[: -len(new)] + old
                break
        out[k.replace(".mlp.", ".feed_forward.")] = v
    return out


def from_legacy_names(sd):
    top = {v: k for k, v in _OLD_TOP.items()}
    out = {}
    for k, v in sd.items():
        k = top.get(k, k)
        for new, old in _OLD_LAYER:
            if k.endswith(old):
                k = k[: -len(old)] + new
                break
        out[k.replace(".feed_forward.", ".mlp.")] = v
    return out


def test_legacy_names_with_hf_native_shapes_import_and_export_losslessly(tmp_path):
    cfg = DogeConfig(**dict(BASE, **MOE, tie_word_embeddings=True))
    hf = hf_model(cfg)
    sd = state_dict(hf)
    old = to_legacy_names({k: v for k, v in sd.items() if k != "lm_head.weight"})
    assert "model.word_embed.weight" in old and "model.layers.1.feed_forward.router_gate.weight" in old
    assert "model.layers.0.pre_residual.weight" in old and not any(".mlp." in k for k in old)
    for i in range(cfg.num_hidden_layers):  # the early CDMoE router bias (zero here): dropped
        old[f"model.layers.{i}.feed_forward.router_gate.bias"] = torch.zeros(2 * cfg.num_keys)
    with pytest.raises(ConversionError, match="pre-2025-06-19"):
        load_hf(old, config=cfg, legacy=False)
    cfg2, params = load_hf(old, config=cfg)
    assert cfg2 == cfg
    ids, mask = batch(2, 13)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.numpy()
    chex.assert_trees_all_close(wmjax_forward(cfg2, params, ids, mask)[0], ref, atol=TOL, rtol=0)
    # -> HF-native checkpoint that transformers loads strictly
    save_hf(cfg2, params, tmp_path / "native")
    hf2, info = transformers.DogeForCausalLM.from_pretrained(tmp_path / "native", attn_implementation="eager",
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        np.testing.assert_array_equal(hf2.eval()(ids, attention_mask=mask).logits.numpy(), ref)


def _legacy_state_dict(cfg: DogeConfig, seed=0):
    """A legacy SmallDoge state dict from docs/DOGE.md's legacy key list: old names, no q/k norm, A [H] and
    dt_proj [H, G*D] (bias per query head)."""
    g = torch.Generator().manual_seed(seed)
    V, d, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = lambda *s: 0.1 * torch.randn(*s, generator=g)
    one = lambda n: 1 + 0.1 * torch.randn(n, generator=g)
    sd = {"model.word_embed.weight": w(V, d), "model.final_layernorm.weight": one(d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "pre_layernorm.weight": one(d), p + "pre_residual.weight": one(d),
            p + "self_attn.q_proj.weight": w(H * D, d), p + "self_attn.k_proj.weight": w(G * D, d),
            p + "self_attn.v_proj.weight": w(G * D, d), p + "self_attn.A": torch.randn(H, generator=g),
            p + "self_attn.dt_proj.weight": w(H, G * D), p + "self_attn.o_proj.weight": w(d, H * D),
            p + "post_layernorm.weight": one(d), p + "post_residual.weight": one(d),
            p + "feed_forward.gate_proj.weight": w(F, d), p + "feed_forward.up_proj.weight": w(F, d),
            p + "feed_forward.down_proj.weight": w(d, F),
        })
    return sd


def _equivalent_hf_model(cfg: DogeConfig, legacy_sd):
    """An independent reference for the legacy layout, run by transformers itself: an MHA HF Doge (one kv head per
    query head, k/v rows replicated, dt_proj split evenly over the replicas, so the per-kv-head bias IS the
    per-query-head bias) with q_norm/k_norm replaced by the identity."""
    H, G, D, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    hf_cfg = transformers.DogeConfig(**cfg.replace(qk_norm=True, dt_heads="kv", num_key_value_heads=H).to_hf_dict())
    model = transformers.DogeForCausalLM(hf_cfg).eval()
    model.config._attn_implementation = "eager"
    sd = {}
    for k, v in from_legacy_names(legacy_sd).items():
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            v = v.reshape(G, D, -1).repeat_interleave(r, 0).reshape(H * D, -1)
        elif k.endswith("dt_proj.weight"):
            v = (v.reshape(H, G, 1, D) / r).expand(H, G, r, D).reshape(H, H * D)
        sd[k] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(("q_norm.weight", "k_norm.weight", "lm_head.weight")) for k in missing)
    for layer in model.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def test_legacy_layout_state_dict_imports_with_equivalent_logits(tmp_path):
    cfg = DogeConfig(**dict(BASE, tie_word_embeddings=True))  # H=4, G=2
    legacy = _legacy_state_dict(cfg)
    cfg2, params = load_hf(legacy, config=cfg)
    assert (cfg2.qk_norm, cfg2.dt_heads) == (False, "query")
    assert params["model"]["layers_0"]["self_attn"]["A"].shape == (4,)
    ref_model = _equivalent_hf_model(cfg, legacy)
    ids, mask = batch(3, 13, pad_row=2, pad_from=8)
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).logits.numpy()
    out, _ = wmjax_forward(cfg2, params, ids, mask)
    chex.assert_trees_all_close(out, ref, atol=TOL, rtol=0)
    # not expressible as HF-native: a clear error, nothing written
    with pytest.raises(ConversionError, match="qk_norm=False.*no choice of its weight") as e:
        save_hf(cfg2, params, tmp_path / "out")
    assert "dt_heads='query' with GQA" in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
