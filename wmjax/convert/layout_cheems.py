"""The tensor layout of an upstream Cheems checkpoint (WonderfulMatrices `CheemsForCausalLM`;
/work/shared/research/ssd_cheems_otce.md 6.1): upstream key <-> wmjax param path, torch shape, transpose.

    model.word_embed.weight                       [V, d]           model/word_embed/embedding
    model.layers.{i}.pre_sequence_layernorm.weight, post_sequence_residual.weight,
                     pre_state_layernorm.weight, post_state_residual.weight                 [d]
    SSD layer:  ssd.{c,b,x}_proj.weight [H*P, d], ssd.dt_proj.weight [H, d], ssd.out_proj.weight [d, H*P],
                ssd.A [H]          (ssd_a="raw"; wmjax's ssd_a="negative_exp" writes ssd.A_log [H] instead)
    attention:  attn.q_proj [H*P, d], attn.{k,v}_proj [Hkv*P, d], attn.dt_proj [H, Hkv*P], attn.A [H],
                attn.o_proj [d, d]
    FFN:        feed_forward.{gate,up}_proj [I, d], down_proj [d, I];  CDMoE also feed_forward.queries.weight
                [heads*R, d], feed_forward.keys [heads, K, 2, R/2], feed_forward.{down,up}_embed.weight [E, d]
    model.final_layernorm.weight [d];  lm_head.weight [V, d] only when untied
Every Linear of the mixers and the MLP has a `.bias` iff hidden_bias (not the CDMoE queries). Linear weights are
transposed to Flax kernels [in, out].

`ssd_a="negative_exp"` models are written with the wmjax key `ssd.A_log` (and `"ssd_a": "negative_exp"` in
config.json), so wmjax -> upstream format -> wmjax is exact; upstream code reads only a raw `ssd.A`, so for it
first apply `as_raw_a(config, params)`: the same function with raw A = -exp(A_log) (exact).
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from wmjax.configs.cheems import CheemsConfig
from wmjax.convert.layout import Entry

__all__ = ["layout", "import_hook", "matches", "as_raw_a", "IGNORED_KEY_PATTERNS"]

# non-persistent in upstream, but present in some saved state dicts: RoPE tables are recomputed
IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$"),)


def layout(config: CheemsConfig) -> list[Entry]:
    """Every tensor of an upstream-format checkpoint of `config` (tied `lm_head.weight` excluded)."""
    c = config
    V, d, F = c.vocab_size, c.hidden_size, c.intermediate_size
    H, G, P = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    bias = c.hidden_bias
    out: list[Entry] = [Entry("model.word_embed.weight", ("model", "word_embed", "embedding"), (V, d), False)]
    for i, kind in enumerate(c.layer_types):
        p, fp = f"model.layers.{i}.", ("model", f"layers_{i}")

        def lin(sub, name, n_out, n_in, has_bias=bias):
            out.append(Entry(f"{p}{sub}.{name}.weight", fp + (sub, name, "kernel"), (n_out, n_in), True))
            if has_bias:
                out.append(Entry(f"{p}{sub}.{name}.bias", fp + (sub, name, "bias"), (n_out,), False))

        def raw(key, path, shape):
            out.append(Entry(p + key, fp + path, shape, False))

        raw("pre_sequence_layernorm.weight", ("pre_sequence_layernorm", "weight"), (d,))
        if kind == "ssd":
            a = "A" if c.ssd_a == "raw" else "A_log"
            raw(f"ssd.{a}", ("ssd", a), (H,))
            for name in ("c_proj", "b_proj", "x_proj"):
                lin("ssd", name, H * P, d)
            lin("ssd", "dt_proj", H, d)
            lin("ssd", "out_proj", d, H * P)
        else:
            lin("attn", "q_proj", H * P, d)
            lin("attn", "k_proj", G * P, d)
            lin("attn", "v_proj", G * P, d)
            raw("attn.A", ("attn", "A"), (H,))
            lin("attn", "dt_proj", H, G * P)
            lin("attn", "o_proj", d, H * P)
        raw("post_sequence_residual.weight", ("post_sequence_residual", "weight"), (d,))
        raw("pre_state_layernorm.weight", ("pre_state_layernorm", "weight"), (d,))
        lin("feed_forward", "gate_proj", F, d)
        lin("feed_forward", "up_proj", F, d)
        lin("feed_forward", "down_proj", d, F)
        if c.is_moe:
            R = c.expert_retrieval_size
            lin("feed_forward", "queries", c.num_cdmoe_heads * R, d, has_bias=False)
            raw("feed_forward.keys", ("feed_forward", "keys"), (c.num_cdmoe_heads, c.num_keys, 2, R // 2))
            raw("feed_forward.down_embed.weight", ("feed_forward", "down_embed"), (c.num_cdmoe_experts, d))
            raw("feed_forward.up_embed.weight", ("feed_forward", "up_embed"), (c.num_cdmoe_experts, d))
        raw("post_state_residual.weight", ("post_state_residual", "weight"), (d,))
    out.append(Entry("model.final_layernorm.weight", ("model", "final_layernorm", "weight"), (d,), False))
    if not c.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (V, d), True))
    return out


def import_hook(config: CheemsConfig, refs: dict, legacy=None) -> tuple[CheemsConfig, dict]:
    """Drop keys that carry no parameters (RoPE buffers). refs: {key: tensor ref}."""
    return config, {k: r for k, r in refs.items() if not any(pat.search(k) for pat in IGNORED_KEY_PATTERNS)}


def matches(d: dict) -> bool:
    """An upstream config.json of Cheems (OTCE's also says model_type "cheems"; the first Cheems said "doge")."""
    return d.get("model_type") in ("cheems", "doge") and "attn_layer_period" in d


def as_raw_a(config: CheemsConfig, params: dict) -> tuple[CheemsConfig, dict]:
    """(config, params) with ssd_a="raw" computing the same function: each SSD layer's A_log becomes A = -exp(A_log)
    (the value the negative_exp model uses). A raw config is returned unchanged."""
    if config.ssd_a == "raw":
        return config, params
    model = dict(params["model"])
    for i, kind in enumerate(config.layer_types):
        if kind == "ssd":
            layer = dict(model[f"layers_{i}"])
            ssd = dict(layer["ssd"])
            a_log = ssd.pop("A_log")
            ssd["A"] = (-jnp.exp(a_log.astype(jnp.float32))).astype(a_log.dtype)
            layer["ssd"] = ssd
            model[f"layers_{i}"] = layer
    return config.replace(ssd_a="raw"), dict(params, model=model)
