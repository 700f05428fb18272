"""The tensor layout of a Doge checkpoint: HF key <-> wmjax param path, shapes, transposes, legacy key names.

One table (`hf_layout`) drives every direction: HF state dict -> params, params -> HF state dict, and the shape
checks of the wmjax-native format. Shapes follow `transformers.DogeForCausalLM` (docs/DOGE.md, Parameters and
state-dict keys) and, for the legacy SmallDoge layouts, docs/DOGE.md, Legacy SmallDoge layouts (`qk_norm=False`: no
q/k norm tensors; `dt_heads="query"`: `A` is [H] and `dt_proj.weight` is [H, G*D]).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from wmjax.config import DogeConfig

__all__ = ["Entry", "hf_layout", "flat_param_shapes", "ConversionError", "check_tensors", "rename_legacy_keys",
           "LEGACY_RENAMES", "IGNORED_KEY_PATTERNS", "hf_native_problem", "detect_layout", "import_hook",
           "legacy_hint"]


class ConversionError(ValueError):
    """A checkpoint could not be converted; the message names every offending key / file."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    path: tuple[str, ...]  # e.g. ("model", "layers_0", "self_attn", "q_proj", "kernel")
    hf_shape: tuple[int, ...]  # torch shape
    transpose: bool  # torch (out, in) <-> flax kernel (in, out)

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.transpose else self.hf_shape

    @property
    def flat_path(self) -> str:
        return "/".join(self.path)


def hf_layout(config: DogeConfig) -> list[Entry]:
    """Every tensor of a HF-format checkpoint of `config` (tied `lm_head.weight` excluded)."""
    c = config
    V, d, F = c.vocab_size, c.hidden_size, c.intermediate_size
    H, G, D, hb = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_bias_heads
    out: list[Entry] = [Entry("model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), (V, d), False)]
    for i in range(c.num_hidden_layers):
        p, fp = f"model.layers.{i}.", ("model", f"layers_{i}")

        def lin(sub, name, n_out, n_in, bias):
            out.append(Entry(f"{p}{sub}.{name}.weight", fp + (sub, name, "kernel"), (n_out, n_in), True))
            if bias:
                out.append(Entry(f"{p}{sub}.{name}.bias", fp + (sub, name, "bias"), (n_out,), False))

        def vec(key, path, n):
            out.append(Entry(p + key, fp + path, (n,), False))

        vec("input_layernorm.weight", ("input_layernorm", "weight"), d)
        vec("input_residual", ("input_residual",), d)
        lin("self_attn", "q_proj", H * D, d, c.attention_bias)
        lin("self_attn", "k_proj", G * D, d, c.attention_bias)
        lin("self_attn", "v_proj", G * D, d, c.attention_bias)
        vec("self_attn.A", ("self_attn", "A"), hb)
        lin("self_attn", "dt_proj", hb, G * D, c.attention_bias)
        lin("self_attn", "o_proj", d, H * D, c.attention_bias)
        if c.qk_norm:
            vec("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), D)
            vec("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), D)
        vec("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), d)
        vec("post_attention_residual", ("post_attention_residual",), d)
        lin("mlp", "gate_proj", F, d, c.mlp_bias)
        lin("mlp", "up_proj", F, d, c.mlp_bias)
        lin("mlp", "down_proj", d, F, c.mlp_bias)
        if c.is_moe:
            lin("mlp", "router_gate", 2 * c.num_keys, d, False)
            out.append(Entry(f"{p}mlp.down_embed.weight", fp + ("mlp", "down_embed"), (c.num_experts, d), False))
            out.append(Entry(f"{p}mlp.up_embed.weight", fp + ("mlp", "up_embed"), (c.num_experts, d), False))
    out.append(Entry("model.norm.weight", ("model", "norm", "weight"), (d,), False))
    if not c.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (V, d), True))
    return out


def flat_param_shapes(layout: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
    """'/'-joined wmjax param path -> shape, for every param a layout names (a param named by several upstream
    keys appears once)."""
    return {e.flat_path: e.flax_shape for e in layout}


# ---------------------------------------------------------------------------------------------------- legacy names
# pre-2025-06-19 SmallDoge names -> HF names (docs/DOGE.md, Legacy SmallDoge layouts). Patterns are applied to
# the part after "model.layers.N."
_LAYER_RENAMES = [
    (re.compile(r"^pre_layernorm\.weight$"), "input_layernorm.weight"),
    (re.compile(r"^pre_residual\.weight$"), "input_residual"),
    (re.compile(r"^post_layernorm\.weight$"), "post_attention_layernorm.weight"),
    (re.compile(r"^post_residual\.weight$"), "post_attention_residual"),
    # a transient HF-converter naming (module-based residuals); the current modules use bare parameters
    (re.compile(r"^input_residual\.weight$"), "input_residual"),
    (re.compile(r"^post_attention_residual\.weight$"), "post_attention_residual"),
    (re.compile(r"^feed_forward\.(.*)$"), r"mlp.\1"),
]
_TOP_RENAMES = {
    "model.word_embed.weight": "model.embed_tokens.weight",
    "model.final_layernorm.weight": "model.norm.weight",
}
LEGACY_RENAMES = (_TOP_RENAMES, _LAYER_RENAMES)
_LAYER_KEY = re.compile(r"^(model\.layers\.\d+\.)(.*)$")
# present in some old checkpoints, carry no parameters of the model (RoPE tables are recomputed)
IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq|rotary_emb)$"),)
# dropped by the official converters (docs/DOGE.md, Parameters: an early CDMoE had a router bias; the current
# one has none)
DROPPED_KEY_PATTERN = re.compile(r"^model\.layers\.\d+\.mlp\.router_gate\.bias$")


def rename_legacy_keys(keys: Iterable[str]) -> dict[str, str]:
    """{new HF name: original name} for every key (unchanged keys map to themselves).

    Raises ConversionError if two original keys map to the same new name (e.g. both `feed_forward.up_proj.weight`
    and `mlp.up_proj.weight`)."""
    out: dict[str, str] = {}
    clashes = []
    for k in keys:
        new = _TOP_RENAMES.get(k, k)
        m = _LAYER_KEY.match(k)
        if m:
            rest = m.group(2)
            for pat, rep in _LAYER_RENAMES:
                if pat.match(rest):
                    rest = pat.sub(rep, rest)
                    break
            new = m.group(1) + rest
        if new in out:
            clashes.append(f"{out[new]!r} and {k!r} both map to {new!r}")
        out[new] = k
    if clashes:
        raise ConversionError("checkpoint mixes legacy and current key names: " + "; ".join(clashes))
    return out


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_tensors(expected: Mapping[str, tuple], found: Mapping[str, tuple[tuple, Optional[str]]], *,
                  what: str, hint: str = "") -> None:
    """Compare expected {key: shape} with found {key: (shape, file or None)}; raise ONE ConversionError listing
    every missing, unexpected and mis-shaped key (with expected / found shapes and the file)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and tuple(found[k][0]) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    where = lambda k: f" in {found[k][1]}" if found[k][1] else ""
    lines = [f"{what}: {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensor(s)"]
    for k in mismatched:
        lines.append(f"  mis-shaped  {k}: expected {_fmt(expected[k])}, found {_fmt(found[k][0])}{where(k)}")
    for k in missing:
        lines.append(f"  missing     {k}: expected {_fmt(expected[k])}")
    for k in unexpected:
        lines.append(f"  unexpected  {k}: found {_fmt(found[k][0])}{where(k)}")
    if hint:
        lines.append(hint)
    raise ConversionError("\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched)


def hf_native_problem(config: DogeConfig) -> Optional[str]:
    """None if `config` can be written as a transformers (HF-native) Doge checkpoint, else the reason why not."""
    reasons = []
    if not config.qk_norm:
        reasons.append(
            "qk_norm=False (legacy SmallDoge attention without q/k RMSNorm): transformers' DogeAttention always "
            "applies q_norm/k_norm, an RMSNorm over head_dim, and no choice of its weight makes it the identity, "
            "so the model cannot be expressed without changing its outputs")
    if config.dt_heads == "query" and config.num_attention_heads != config.num_key_value_heads:
        reasons.append(
            f"dt_heads='query' with GQA (A/dt_proj sized by the {config.num_attention_heads} query heads, "
            f"num_key_value_heads={config.num_key_value_heads}): transformers computes one dynamic-mask bias per "
            "kv head and shares it across the query heads of a group, which cannot represent per-query-head biases")
    if not reasons:
        return None
    return ("this is a legacy SmallDoge layout with no lossless HF-native (transformers) equivalent: "
            + "; and ".join(reasons) + ". Keep it in the wmjax format (save_wmjax / --to wmjax).")


# ---------------------------------------------------------------------------------------------------- import hook
def detect_layout(config: DogeConfig, keys_shapes: Mapping[str, tuple]) -> DogeConfig:
    """`config` with `qk_norm` / `dt_heads` set from the tensors (HF-normalized names): q/k norm present or not,
    `A` sized by query heads (-> dt_heads='query' when H != G; when H == G both layouts are the same tensors and
    the HF-native 'kv' is kept unless the config already says 'query')."""
    changes: dict[str, Any] = {}
    qk = any(k.endswith(".self_attn.q_norm.weight") or k.endswith(".self_attn.k_norm.weight") for k in keys_shapes)
    if qk != config.qk_norm:
        changes["qk_norm"] = qk
    H, G = config.num_attention_heads, config.num_key_value_heads
    a = keys_shapes.get("model.layers.0.self_attn.A")
    if a is not None and H != G and len(a) == 1:
        if a[0] == H and config.dt_heads != "query":
            changes["dt_heads"] = "query"
        elif a[0] == G and config.dt_heads != "kv":
            changes["dt_heads"] = "kv"
    return config.replace(**changes) if changes else config


def import_hook(config: DogeConfig, refs: dict, legacy) -> tuple[DogeConfig, dict]:
    """Doge's upstream quirks before the layout applies: drop ignorable keys; unless legacy=False rename legacy
    SmallDoge keys, drop `router_gate.bias` (warning if non-zero) and detect the legacy layouts (`detect_layout`).
    refs: {key: wmjax.convert.io.TensorRef}."""
    refs = {k: r for k, r in refs.items() if not any(p.search(k) for p in IGNORED_KEY_PATTERNS)}
    if legacy is False:
        return config, refs
    out = {}
    for new, old in rename_legacy_keys(refs).items():
        if DROPPED_KEY_PATTERN.match(new):
            b = np.asarray(refs[old].load(), np.float32)
            if np.any(b != 0):
                warnings.warn(f"dropping non-zero legacy {old} (max |b| = {np.abs(b).max():.3g}): the current CDMoE "
                              "router has no bias (docs/DOGE.md, CDMoE), as in the official converters; outputs "
                              "will differ from the original model", stacklevel=4)
            continue
        out[new] = refs[old]
    return detect_layout(config, {k: r.shape for k, r in out.items()}), out


def legacy_hint(config: DogeConfig, found: Mapping[str, Any], legacy) -> str:
    """A hint for a failed strict (legacy=False) import that looks like a legacy SmallDoge checkpoint."""
    hints = []
    if legacy is False:
        old = [k for k in found if rename_legacy_keys([k]).popitem()[0] != k][:3]
        if old:
            hints.append(f"keys such as {old} are pre-2025-06-19 SmallDoge names: load with legacy='auto' to rename "
                         "them")
        if config.qk_norm and not any(k.endswith("q_norm.weight") for k in found):
            hints.append("no q_norm/k_norm tensors: a legacy SmallDoge layout (qk_norm=False), load with "
                         "legacy='auto'")
    return ("hint: " + "; ".join(hints)) if hints else ""
