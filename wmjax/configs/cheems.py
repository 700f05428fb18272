"""Cheems configuration: a frozen, validated dataclass mirroring the upstream `CheemsConfig`
(LoserCheems/WonderfulMatrices `configuration_cheems.py`; /work/shared/research/ssd_cheems_otce.md 1.2).

Same field names as upstream, except the RoPE parameters, flattened (`rope_theta`, `rope_type`, `rope_factor`)
so the config stays hashable (a static argument of jitted functions), as in `wmjax.config.DogeConfig`.
Layer kinds: layer i is attention iff i % attn_layer_period == attn_layer_offset, else SSD (`layer_types`).
Every head size is hidden_size // num_attention_heads (attention head_dim = SSD head size P = SSD state size N).

wmjax-only fields (docs/CHEEMS.md):
  * `ssd_a`: "negative_exp" (default, for new training): the SSD parameter is `A_log` [H] (init 0) and
    A = -exp(A_log) < 0, a decaying, stable scan. "raw": the parameter is upstream's `A` [H] (init +1), used as is;
    the exact recurrence grows and overflows from ~128 tokens at init (kept unclamped, for converted weights).
    `from_upstream_dict` gives "raw".
  * `attn_a_init`: the initial value of the dynamic-mask attention's `A` [H] in `init_params` (new training only;
    converted weights bring their own A). 0.0 (default; Doge's init, every key bias exp(0) = 1): bias =
    exp(A softplus(dt)) starts flat. 1.0 (upstream `_init_weights`, what `from_upstream_dict` gives): the biases
    are e^softplus(dt) from step 0, grow to ~1e4 within ~20 steps at lr 4e-3 and, with bf16 compute, the
    bf16-rounded dt makes large biases tie exactly, which blows the gradient up (docs/CHEEMS.md, Training
    stability).
  * `keep_window_size`: the dynamic-mask attention keeps the top-w keys per row by bias (Doge's rule). Cheems masks
    nothing beyond causality (upstream dynamic_mask_ratio = 0), so the default keeps every key (2**30).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from wmjax.config import ConfigError, ConfigFields, DogeConfig, known_fields, pop_upstream_rope, single_eos

__all__ = ["CheemsConfig", "PRESETS", "SSD_A_MODES"]

SSD_A_MODES = ("negative_exp", "raw")
KEEP_ALL = 2 ** 30  # keep_window_size that keeps every key


@dataclasses.dataclass(frozen=True)
class CheemsConfig(ConfigFields):
    vocab_size: int = 32768
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 32
    hidden_bias: bool = False
    hidden_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "dynamic"  # "default" | "dynamic" (NTK, HF `dynamic`) | "linear"
    rope_factor: float = 4.0
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 2
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    tie_word_embeddings: bool = True
    ssd_chunk_size: int = 256
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None  # None -> num_attention_heads
    attention_dropout: float = 0.0
    dynamic_mask_ratio: float = 0.0
    attn_layer_period: int = 8
    attn_layer_offset: int = 7
    is_moe: bool = False
    num_cdmoe_experts: int = 16348
    num_cdmoe_heads: int = 4
    num_cdmoe_experts_per_head: int = 8
    expert_retrieval_size: int = 64
    output_router_logits: bool = False  # Cheems' CDMoE has no router loss; kept for the family contract
    router_aux_loss_coef: float = 0.0
    # wmjax-only
    ssd_a: str = "negative_exp"
    attn_a_init: float = 0.0  # upstream 1.0; init only (docs/CHEEMS.md, Training stability)
    keep_window_size: int = KEEP_ALL

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        err = self._invalid

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "ssd_chunk_size", "attn_layer_period",
                  "keep_window_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                err(f, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            err("num_attention_heads", f"must divide hidden_size={self.hidden_size} (head size = hidden / heads)")
        if self.head_dim % 2:
            err("num_attention_heads", f"hidden_size / heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            err("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.attn_layer_offset, int) or self.attn_layer_offset < 0:
            err("attn_layer_offset", "must be a non-negative integer")
        if self.hidden_act != "silu":
            err("hidden_act", "only 'silu' is used by Cheems")
        if not 0.0 <= self.hidden_dropout < 1.0:
            err("hidden_dropout", "must be in [0, 1)")
        if self.attention_dropout != 0.0:
            err("attention_dropout", "attention-probability dropout is not supported (upstream default 0.0)")
        if self.dynamic_mask_ratio not in (0, 0.0):
            err("dynamic_mask_ratio", "only 0.0 (no key dropped beyond causality, the upstream default) is "
                "supported: the upstream ratio rule thresholds over every key of the call, future keys included "
                "(docs/CHEEMS.md); use keep_window_size for a causal top-w rule")
        if self.rms_norm_eps <= 0:
            err("rms_norm_eps", "must be > 0")
        self._check_rope()
        if self.ssd_a not in SSD_A_MODES:
            err("ssd_a", f"must be one of {SSD_A_MODES}")
        if (not isinstance(self.attn_a_init, (int, float)) or isinstance(self.attn_a_init, bool)
                or not math.isfinite(self.attn_a_init)):
            err("attn_a_init", "must be a finite number")
        if self.is_moe:
            for f in ("num_cdmoe_experts", "num_cdmoe_heads", "num_cdmoe_experts_per_head", "expert_retrieval_size"):
                v = getattr(self, f)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    err(f, "must be a positive integer")
            if self.expert_retrieval_size % 2:
                err("expert_retrieval_size", "must be even (the query splits into two product-key halves)")
            if self.num_cdmoe_experts_per_head > self.num_keys:
                err("num_cdmoe_experts_per_head", f"must be <= int(sqrt(num_cdmoe_experts)) = {self.num_keys} "
                    "(top-k over each half's keys)")
        self._check_token_ids()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        """Head size of attention and SSD alike (= SSD state size N): hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> tuple:
        """Per-layer kinds, "attention" or "ssd" (upstream `layers_type`: "attn" / "ssd")."""
        return tuple("attention" if i % self.attn_layer_period == self.attn_layer_offset else "ssd"
                     for i in range(self.num_hidden_layers))

    def ssm_cache_shape(self, i: int) -> tuple:
        """(heads, head_dim, state_size, conv_width, conv_channels) of SSD layer i's cache (no convolution)."""
        return (self.num_attention_heads, self.head_dim, self.head_dim, 0, 0)

    @property
    def num_keys(self) -> int:
        """Product keys per half: int(sqrt(num_cdmoe_experts)) (ids >= num_keys**2 are unreachable)."""
        return math.isqrt(self.num_cdmoe_experts)

    @property
    def attention_config(self) -> DogeConfig:
        """The view of this config that Doge's dynamic-mask attention layer (`wmjax.layers.attention`) reads:
        no q/k norm (`qk_norm=False`), the bias per query head (`dt_heads="query"`: A [H], dt_proj Hkv*P -> H),
        Linear biases = hidden_bias, head_dim = hidden_size // heads."""
        return DogeConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, rope_type=self.rope_type, rope_factor=self.rope_factor,
            attention_bias=self.hidden_bias, mlp_bias=self.hidden_bias, keep_window_size=self.keep_window_size,
            qk_norm=False, dt_heads="query")

    # read by the decode caches and the sampler (wmjax.cache, wmjax.sampling) and the gated MLP (wmjax.layers.mlp)
    @property
    def num_bias_heads(self) -> int:
        """Heads carrying a dynamic-mask bias: the query heads (upstream Cheems' A / dt_proj are sized by H)."""
        return self.num_attention_heads

    @property
    def sliding_window(self):
        return None

    @property
    def mlp_bias(self) -> bool:
        return self.hidden_bias

    # ------------------------------------------------------------------ dict / upstream
    # keys of an upstream config.json that carry no math (ignored on import)
    _UPSTREAM_IGNORED = frozenset({
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
        "return_dict", "output_hidden_states", "output_attentions", "torchscript", "auto_map", "_name_or_path",
        "id2label", "label2id", "problem_type", "tokenizer_class", "is_encoder_decoder", "chunk_size_feed_forward",
        "tie_encoder_decoder", "decoder_start_token_id", "add_cross_attention", "cross_attention_hidden_size",
        "finetuning_task", "prefix", "sep_token_id", "task_specific_params", "pruned_heads", "tf_legacy_loss",
        "use_bfloat16", "bad_words_ids", "begin_suppress_tokens", "num_labels", "is_decoder",
        "_attn_implementation_autoset", "num_logits_to_keep",
    })
    # the first Cheems config (8f42512) spelled the CDMoE fields with a double m
    _LEGACY_NAMES = {"num_cdmmoe_experts": "num_cdmoe_experts", "num_cdmmoe_heads": "num_cdmoe_heads",
                     "num_cdmmoe_experts_per_head": "num_cdmoe_experts_per_head"}

    @classmethod
    def from_upstream_dict(cls, d: dict[str, Any], *, strict: bool = True, **overrides) -> "CheemsConfig":
        """Translate an upstream Cheems config.json dict. The SSD A mode is "raw" (upstream's parameter, used as
        is) unless the dict carries wmjax's `ssd_a` (written by `to_upstream_dict` for negative_exp models);
        `attn_a_init` is upstream's 1.0 unless the dict carries wmjax's (it only matters for a fresh init)."""
        d = dict(d)
        model_type = d.get("model_type", "cheems")
        if model_type not in ("cheems", "doge") or (model_type == "doge" and "attn_layer_period" not in d):
            raise ConfigError(f"config.json model_type={model_type!r}: expected 'cheems'")
        for old, new in cls._LEGACY_NAMES.items():
            if old in d:
                if new in d:
                    raise ConfigError(f"config.json has both {old!r} (legacy spelling) and {new!r}")
                d[new] = d.pop(old)
        out: dict[str, Any] = {"ssd_a": d.pop("ssd_a", "raw"), "attn_a_init": float(d.pop("attn_a_init", 1.0))}
        out.update(pop_upstream_rope(d))
        out["eos_token_id"] = single_eos(d.pop("eos_token_id", None))
        out.update(known_fields(d, {f.name for f in dataclasses.fields(cls)}, cls._UPSTREAM_IGNORED, strict=strict,
                                message="config.json has field(s) wmjax's Cheems does not know"))
        out.update(overrides)
        return cls(**out)

    def to_upstream_dict(self) -> dict[str, Any]:
        """The config.json dict upstream `CheemsConfig` reads. wmjax-only fields are written only when they
        differ from what upstream does (`ssd_a`="negative_exp", `attn_a_init` != 1, a finite keep_window_size)."""
        rope = None
        if self.rope_type != "default":
            rope = {"rope_type": self.rope_type, "factor": self.rope_factor,
                    "original_max_position_embeddings": self.max_position_embeddings}
        d = {"architectures": ["CheemsForCausalLM"], "model_type": "cheems"}
        skip = {"rope_type", "rope_factor", "ssd_a", "attn_a_init", "keep_window_size", "output_router_logits",
                "router_aux_loss_coef"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                d[f.name] = getattr(self, f.name)
        d["rope_scaling"] = rope
        d["use_cache"] = True
        if self.ssd_a != "raw":
            d["ssd_a"] = self.ssd_a
        if self.attn_a_init != 1.0:
            d["attn_a_init"] = self.attn_a_init
        if self.keep_window_size != KEEP_ALL:
            d["keep_window_size"] = self.keep_window_size
        return d


_COMMON = dict(vocab_size=32768, max_position_embeddings=2048, rope_theta=10000.0, rope_type="dynamic",
               rope_factor=4.0, tie_word_embeddings=True, ssd_chunk_size=256, attn_layer_period=8,
               attn_layer_offset=7, bos_token_id=0, eos_token_id=1, pad_token_id=2)

# The upstream default config (the only size the repository defines; no weights are published) and its CDMoE
# variant, plus the Doge-160M width for comparable training runs (docs/CHEEMS.md, Presets).
PRESETS: dict[str, dict[str, Any]] = {
    # 369,493,248 parameters (tied): d 1024, 32 layers (28 SSD, 4 attention), 8 heads of 128
    "Cheems-370M": dict(_COMMON, hidden_size=1024, intermediate_size=2048, num_hidden_layers=32,
                        num_attention_heads=8),
    # 1,450,304,768 parameters: the same with is_moe=True (16348 experts, 4 heads x 8, retrieval 64)
    "Cheems-1.5B-MoE": dict(_COMMON, hidden_size=1024, intermediate_size=2048, num_hidden_layers=32,
                            num_attention_heads=8, is_moe=True, num_cdmoe_experts=16348, num_cdmoe_heads=4,
                            num_cdmoe_experts_per_head=8, expert_retrieval_size=64),
    # Doge-160M's width and depth: d 768, 24 layers (21 SSD, 3 attention), 6 heads of 128
    "Cheems-160M": dict(_COMMON, hidden_size=768, intermediate_size=1536, num_hidden_layers=24,
                        num_attention_heads=6),
}
