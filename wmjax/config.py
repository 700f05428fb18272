"""Model configuration: a frozen, validated dataclass mirroring `transformers.DogeConfig`.

Every field of the Hugging Face config that changes the math is here, under the same name, except the RoPE
parameters, which are flattened (`rope_theta`, `rope_type`, `rope_factor`) so that the config stays hashable
(it is a static argument of jitted functions). `to_hf_dict` / `from_hf_dict` translate to and from the
`config.json` of a `transformers` checkpoint (both the v5 `rope_parameters` form and the older
`rope_theta` + `rope_scaling` form are read). `pop_upstream_rope`, `single_eos` and `known_fields` are the
pieces of that translation the families' `from_upstream_dict` share.

wmjax-only fields (documented in docs/DOGE.md):
  * `router_layout`: "hf" reproduces HF's `router_logits.view(2, N, K)` reshape over the flattened batch
    (token m's key logits come from tokens m//2 and (N+m)//2; every published MoE checkpoint was trained with
    it); "per_token" is the intended split (each token's own 2K logits are [x-keys | y-keys]), for new training.
  * `qk_norm`, `dt_heads`: legacy SmallDoge layouts (no q/k RMSNorm; `A`/`dt_proj` sized by the query heads).
"""

from __future__ import annotations

import dataclasses
import sys
import json
import math
import os
import warnings
from typing import Any, Optional

__all__ = ["DogeConfig", "PRESETS", "ConfigError", "ConfigFields", "pop_upstream_rope", "single_eos", "known_fields"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the field."""


_ROPE_TYPES = ("default", "dynamic", "linear")
_ROUTER_LAYOUTS = ("hf", "per_token")
_DT_HEADS = ("kv", "query")


class ConfigFields:
    """The dict side of every family's frozen config dataclass, written once: `replace`, `from_dict` (unknown keys
    are an error naming them), `to_dict` (tuples as lists: the YAML / JSON form) and `preset` (a published size
    from the defining module's `PRESETS` dict, with field overrides); and the checks their `validate` share
    (`_invalid`, `_check_token_ids`, `_check_rope`)."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Build from a dict of wmjax field names; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def preset(cls, name: str, **overrides):
        """A published size (the defining module's PRESETS), with field overrides."""
        presets = sys.modules[cls.__module__].PRESETS
        if name not in presets:
            family = cls.__name__.removesuffix("Config")
            raise ConfigError(f"unknown {family} preset {name!r}; available: {sorted(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    # validation pieces
    def _invalid(self, field: str, msg: str):
        """Raise ConfigError("<Config>.<field>=<value>: <msg>")."""
        raise ConfigError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {msg}")

    def _check_token_ids(self) -> None:
        """pad / bos / eos_token_id: each None or an int in [0, vocab_size)."""
        for f in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                self._invalid(f, f"must be None or in [0, vocab_size={self.vocab_size})")

    def _check_rope(self) -> None:
        """The flattened RoPE fields: rope_theta > 0, rope_type one of _ROPE_TYPES, rope_factor >= 1 when scaled."""
        if self.rope_theta <= 0:
            self._invalid("rope_theta", "must be > 0")
        if self.rope_type not in _ROPE_TYPES:
            self._invalid("rope_type", f"must be one of {_ROPE_TYPES}")
        if self.rope_type != "default" and self.rope_factor < 1.0:
            self._invalid("rope_factor", "must be >= 1 for scaled RoPE")


# ------------------------------------------------------------------ upstream config.json pieces
def pop_upstream_rope(d: dict[str, Any]) -> dict[str, Any]:
    """Pop the RoPE keys of an upstream config.json dict `d` (v5 `rope_parameters`, or `rope_theta` + the older
    `rope_scaling`) -> {"rope_theta", "rope_type", "rope_factor" (1.0 for "default")}. ConfigError when a scaled
    RoPE's original_max_position_embeddings differs from max_position_embeddings (the scaling here uses that)."""
    rope = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})
    d.pop("rope_scaling", None)
    theta = rope.get("rope_theta", d.pop("rope_theta", 10000.0))
    d.pop("rope_theta", None)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    orig = rope.get("original_max_position_embeddings")
    if rtype != "default" and orig is not None and orig != d.get("max_position_embeddings", 2048):
        raise ConfigError(
            f"rope original_max_position_embeddings={orig} differs from max_position_embeddings="
            f"{d.get('max_position_embeddings')}: dynamic/linear RoPE here scales by max_position_embeddings; "
            "not supported")
    return {"rope_theta": float(theta), "rope_type": rtype,
            "rope_factor": float(rope.get("factor", 1.0)) if rtype != "default" else 1.0}


def single_eos(eos):
    """An upstream eos_token_id that may be a list: its first id (None for an empty list)."""
    if isinstance(eos, (list, tuple)):
        return eos[0] if eos else None
    return eos


def known_fields(d: dict[str, Any], names, ignored, *, strict: bool, message: str,
                 rename: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The entries of an upstream dict `d` whose key is in `names` (or a `rename` key: stored under its new name);
    a key that is neither nor in `ignored` is a ConfigError "<message>: [keys]" when strict (else dropped)."""
    rename = rename or {}
    out, unknown = {}, []
    for k, v in d.items():
        if k in rename:
            out[rename[k]] = v
        elif k in names:
            out[k] = v
        elif k not in ignored:
            unknown.append(k)
    if unknown and strict:
        raise ConfigError(f"{message}: {sorted(unknown)}")
    return out


@dataclasses.dataclass(frozen=True)
class DogeConfig(ConfigFields):
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None  # None -> num_attention_heads (as HF)
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads (as HF)
    hidden_act: str = "silu"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "dynamic" (NTK, HF `dynamic`) | "linear"
    rope_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None
    keep_window_size: int = 2048
    is_moe: bool = False
    num_experts: int = 16384
    num_experts_per_tok: int = 64
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # wmjax-only
    router_layout: str = "hf"
    qk_norm: bool = True
    dt_heads: str = "kv"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
                object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        err = self._invalid

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "keep_window_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                err(f, "must be a positive integer")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            err("head_dim", "must be a positive integer (or None with hidden_size divisible by num_attention_heads)")
        if self.head_dim % 2:
            err("head_dim", "must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            err("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "silu":
            err("hidden_act", "only 'silu' is used by Doge")
        for f in ("hidden_dropout",):
            if not 0.0 <= getattr(self, f) < 1.0:
                err(f, "must be in [0, 1)")
        if self.attention_dropout != 0.0:
            err("attention_dropout", "attention-probability dropout is not supported (every published Doge uses 0.0)")
        if self.rms_norm_eps <= 0:
            err("rms_norm_eps", "must be > 0")
        self._check_rope()
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            err("sliding_window", "must be None or a positive integer")
        if self.is_moe:
            if self.num_experts <= 0:
                err("num_experts", "must be positive")
            k = math.isqrt(self.num_experts)
            if k * k != self.num_experts:
                err("num_experts", "must be a perfect square (product-key retrieval over sqrt(num_experts) keys)")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                err("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        if self.router_layout not in _ROUTER_LAYOUTS:
            err("router_layout", f"must be one of {_ROUTER_LAYOUTS}")
        if self.dt_heads not in _DT_HEADS:
            err("dt_heads", f"must be one of {_DT_HEADS}")
        self._check_token_ids()

    # ------------------------------------------------------------------ derived
    @property
    def num_keys(self) -> int:
        """Product-key count per key set: floor(sqrt(num_experts))."""
        return math.isqrt(self.num_experts)

    @property
    def num_bias_heads(self) -> int:
        """Heads carrying a dynamic-mask bias: kv heads (HF-native) or query heads (legacy)."""
        return self.num_key_value_heads if self.dt_heads == "kv" else self.num_attention_heads

    # ------------------------------------------------------------------ dict / HF
    # keys of a HF config.json that carry no math (ignored on import)
    _HF_IGNORED = frozenset({
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "output_router_logits", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "auto_map", "_name_or_path", "id2label", "label2id", "problem_type", "tokenizer_class",
        "is_encoder_decoder", "chunk_size_feed_forward", "tie_encoder_decoder", "decoder_start_token_id",
        "add_cross_attention", "cross_attention_hidden_size", "finetuning_task", "prefix", "sep_token_id",
        "task_specific_params", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
        "begin_suppress_tokens", "num_labels", "is_decoder", "_attn_implementation_autoset",
    })

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, strict: bool = True, **overrides) -> "DogeConfig":
        """Translate a `transformers` Doge config.json dict (v4 or v5 form, or legacy small-doge)."""
        d = dict(d)
        model_type = d.get("model_type", "doge")
        if model_type != "doge":
            raise ConfigError(f"config.json model_type={model_type!r}: expected 'doge'")
        out = pop_upstream_rope(d)
        # legacy small-doge names
        if "hidden_bias" in d:
            hb = d.pop("hidden_bias")
            d.setdefault("attention_bias", hb)
            d.setdefault("mlp_bias", hb)
        if "dynamic_mask_ratio" in d:
            r = d.pop("dynamic_mask_ratio")
            if r not in (0, 0.0, None):
                raise ConfigError(f"dynamic_mask_ratio={r}: the pre-2025-06 kthvalue masking rule is not supported")
        out["eos_token_id"] = single_eos(d.pop("eos_token_id", None))
        out.update(known_fields(d, {f.name for f in dataclasses.fields(cls)}, cls._HF_IGNORED, strict=strict,
                                message="config.json has field(s) wmjax does not know"))
        out.update(overrides)
        if out.get("head_dim") is None:
            out.pop("head_dim", None)
        return cls(**out)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dict `transformers.DogeConfig` (v5) reads."""
        if not self.qk_norm or (self.dt_heads == "query" and self.num_attention_heads != self.num_key_value_heads):
            raise ConfigError(
                "this is a legacy SmallDoge layout (qk_norm=False or dt_heads='query' with GQA); it has no "
                "HF-native equivalent, so it cannot be written as a transformers config")
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
            rope["original_max_position_embeddings"] = self.max_position_embeddings
        d = {
            "architectures": ["DogeForCausalLM"],
            "model_type": "doge",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "hidden_dropout": self.hidden_dropout,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "keep_window_size": self.keep_window_size,
            "is_moe": self.is_moe,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob,
            "output_router_logits": self.output_router_logits,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.router_layout != "hf" and self.is_moe:
            # transformers keeps unknown config.json keys as plain attributes (and ignores this one); from_hf_dict
            # reads it back
            d["router_layout"] = self.router_layout
            warnings.warn("router_layout='per_token': transformers ignores this and routes with its view(2, N, K) "
                          "layout (docs/DOGE.md, CDMoE router layout), so its outputs differ from wmjax's for N > 1 "
                          "tokens; wmjax.convert.load_hf reads the layout back from config.json", stacklevel=2)
        return d

    # the names the model-family registry uses for the upstream (here: transformers) config.json
    from_upstream_dict = from_hf_dict
    to_upstream_dict = to_hf_dict

    @classmethod
    def from_hf_json(cls, path: str, **overrides) -> "DogeConfig":
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(file) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{file}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{file}: {e}") from None

    def save_hf_json(self, path: str) -> None:
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(file, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)



_COMMON = dict(vocab_size=32768, head_dim=128, max_position_embeddings=2048, keep_window_size=2048,
               rope_theta=10000.0, rope_type="dynamic", rope_factor=4.0, tie_word_embeddings=True,
               bos_token_id=0, eos_token_id=1, pad_token_id=2)

# Published configs (docs/DOGE.md, Published configs; SmallDoge training recipes).
PRESETS: dict[str, dict[str, Any]] = {
    "Doge-20M": dict(_COMMON, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=2, num_key_value_heads=1),
    "Doge-60M": dict(_COMMON, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=4, num_key_value_heads=2),
    "Doge-160M": dict(_COMMON, hidden_size=768, intermediate_size=1536, num_hidden_layers=24,
                      num_attention_heads=6, num_key_value_heads=3),
    "Doge-320M": dict(_COMMON, hidden_size=1024, intermediate_size=2048, num_hidden_layers=32,
                      num_attention_heads=8, num_key_value_heads=4),
    "Doge-20M-MoE": dict(_COMMON, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=2, num_key_value_heads=1, is_moe=True, num_experts=1024,
                         num_experts_per_tok=16),
    "Doge-120M-MoE": dict(_COMMON, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                          num_attention_heads=4, num_key_value_heads=2, is_moe=True, num_experts=4096,
                          num_experts_per_tok=32),
}
