"""The tensor layout of an Om checkpoint: upstream `OmLLM.state_dict()` key <-> wmjax param path (om_arc.md §7.1).

Stacked layout (`stacked_attn=True` / `stacked=True`, the default of both branches). The branch is read from the
config's flags: main has `attn_norm`, `state_norm` and `mlp_norm` LayerNorms (weight + bias) and MLP biases;
heavyball has a per-head `scaling_factor` per pass, a weight-only RMSNorm `mlp_norm` and no MLP biases.
StackedLinear weights [1, H, in, out] and `init_state` [1, S, D] keep their upstream shapes (no transpose);
nn.Linear weights [out, in] are transposed to Dense kernels [in, out]; LayerNorm weight -> Flax `scale`.

Upstream RoPE constants (`layers.{l}.attn.attn.attn_modules.{p}.position_embedder.{thetas,ixs_sin,ixs_sin_neg}`,
frozen Parameters on main, buffers on heavyball) are not learned: wmjax recomputes them, so they are ignored on
import (IGNORED_KEY_PATTERNS) and not written on export (load into upstream with `strict=False`, or let its
constructor's own values stand).
"""

from __future__ import annotations

import re
from typing import Optional

from wmjax.configs.om import OmConfig
from wmjax.convert.layout import Entry

__all__ = ["layout", "IGNORED_KEY_PATTERNS", "import_hook", "matches", "export_problem"]

IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)position_embedder\.(thetas|ixs_sin|ixs_sin_neg)$"),)


def import_hook(config: OmConfig, refs: dict, legacy=None) -> tuple[OmConfig, dict]:
    """Drop the upstream RoPE constants (recomputed, not learned). refs: {key: tensor ref}."""
    return config, {k: r for k, r in refs.items() if not any(p.search(k) for p in IGNORED_KEY_PATTERNS)}


def matches(d: dict) -> bool:
    """An Om config dict: written by wmjax (model_type "om") or upstream's `config/model.json` OmLLM kwargs
    (no model_type)."""
    return d.get("model_type") == "om" or ("model_type" not in d and "dim_input" in d and "dims_key" in d)


def export_problem(config: OmConfig) -> Optional[str]:
    """None if upstream Om code computes `config`'s model from the written checkpoint (or, for rope="standard",
    loads it: `to_upstream_dict` warns that upstream's RoPE differs), else why not."""
    if config.branch == "custom":
        return ("the main/heavyball flags are mixed (qkv_norm, attn_norm, state_norm, mlp_norm, mlp_bias, "
                "end_attends_start, zero_pad_embeddings): no upstream branch computes this model")
    return None


def layout(config: OmConfig) -> list[Entry]:
    """Every learned tensor of an upstream Om checkpoint of `config` (tied: `proj_out.weight` names the
    embedding too)."""
    c = config
    V, D, Fh, H, S, r = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.state_len,
                         c.proj_rank)
    out = [Entry("embedder.weight", ("embedder", "embedding"), (V, D), False)]
    for i, k in enumerate(c.ngram_sizes):
        rank = D // k
        out.append(Entry(f"ngram_embs.{i}.ngram_down_proj.weight", (f"ngram_embs_{i}", "ngram_down_proj", "kernel"),
                         (rank, k * D), True))
        out.append(Entry(f"ngram_embs.{i}.ngram_up_proj.weight", (f"ngram_embs_{i}", "ngram_up_proj", "kernel"),
                         (D, rank), True))
    for l in range(c.num_hidden_layers):
        p, fp = f"layers.{l}.", (f"layers_{l}",)
        out.append(Entry(p + "attn.init_state", fp + ("attn", "init_state"), (1, S, D), False))
        for q in range(c.num_passes):
            din = D if q == 0 else c.dims_value[q - 1]
            for name in ("proj_q", "proj_k", "proj_v", "proj_q_state", "proj_k_state", "proj_v_state"):
                dout = c.dims_value[q] if name.startswith("proj_v") else c.dims_key[q]
                out.append(Entry(f"{p}attn.attn.attn_modules.{q}.{name}.weights",
                                 fp + ("attn", "attn", f"attn_modules_{q}", name, "weights"), (1, H, din, dout), False))
            if c.qkv_norm:
                out.append(Entry(f"{p}attn.attn.attn_modules.{q}.scaling_factor",
                                 fp + ("attn", "attn", f"attn_modules_{q}", "scaling_factor"), (H,), False))
        if c.dims_value[-1] != r:
            for name in ("proj_out", "proj_out_state"):
                out.append(Entry(f"{p}attn.attn.{name}.weights", fp + ("attn", "attn", name, "weights"),
                                 (1, H, c.dims_value[-1], r), False))
        for name in ("proj_out", "proj_out_state"):
            out.append(Entry(f"{p}attn.{name}.weight", fp + ("attn", name, "kernel"), (D, H * r), True))
        norms = [n for n, on in (("attn_norm", c.attn_norm), ("state_norm", c.state_norm)) if on]
        for n in norms + (["mlp_norm"] if c.mlp_norm == "layernorm" else []):
            out.append(Entry(f"{p}{n}.weight", fp + (n, "scale"), (D,), False))
            out.append(Entry(f"{p}{n}.bias", fp + (n, "bias"), (D,), False))
        if c.mlp_norm == "rmsnorm":
            out.append(Entry(f"{p}mlp_norm.weight", fp + ("mlp_norm", "weight"), (D,), False))
        widths = [D, Fh // 2, Fh // 2, D] if c.mlp_1221 else [D, Fh, D]
        for j in range(len(widths) - 1):
            out.append(Entry(f"{p}mlp.{2 * j}.weight", fp + ("mlp", f"layers_{2 * j}", "kernel"),
                             (widths[j + 1], widths[j]), True))
            if c.mlp_bias:
                out.append(Entry(f"{p}mlp.{2 * j}.bias", fp + ("mlp", f"layers_{2 * j}", "bias"), (widths[j + 1],),
                                 False))
    if c.tie_word_embeddings:  # upstream's head is untied: written as a copy of the embedding
        out.append(Entry("proj_out.weight", ("embedder", "embedding"), (V, D), False))
    else:
        out.append(Entry("proj_out.weight", ("proj_out", "kernel"), (V, D), True))
    return out
