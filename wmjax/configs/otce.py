"""OTCE (Observer-Thinker-Conceiver-Expresser, LoserCheems/OTCE, arXiv 2406.16495): a frozen, validated config
mirroring the upstream `CheemsOTCEConfig` (/work/shared/research/ssd_cheems_otce.md §2.2; docs/OTCE.md).

Decoder layers come in four fixed stages, counts from the config:

    Observer   num_observation_layers  selective SSM (Mamba-1) mixer   FFN: layer 0 dense, the rest MoE
    Thinker    num_thinking_layers     causal GQA attention            FFN: MoE
    Conceiver  num_conseption_layers   selective SSM mixer             FFN: MoE, the last one dense
    Expresser  num_expression_layers   causal GQA attention            FFN: dense; + dense/projection head

"MoE" is the cross-domain shared-parameter MoE (`wmjax.layers.shared_moe`) when num_experts > 1, else the dense
MLP. `num_hidden_layers` and `is_moe` are derived (read-only properties); `from_dict` accepts them when they
agree with the stage counts / num_experts.

wmjax-only field: `attention_logn` (default False) applies upstream's flash-path query scaling
q *= max(1, ln(65 + position) / ln(4096)) in attention; upstream's default SDPA path computes it on the wrong
axis, where it is 1 (docs/OTCE.md, Upstream bugs).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Union

from wmjax.config import ConfigError, ConfigFields, known_fields, single_eos

__all__ = ["OTCEConfig", "PRESETS", "EXPERT_TYPES"]

EXPERT_TYPES = ("expansive", "cohesive", None)
_DERIVED = ("num_hidden_layers", "is_moe")

# upstream config.json keys that carry no math (ignored on import)
_UPSTREAM_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "auto_map", "_name_or_path", "id2label",
    "label2id", "problem_type", "tokenizer_class", "is_encoder_decoder", "chunk_size_feed_forward",
    "tie_encoder_decoder", "decoder_start_token_id", "add_cross_attention", "finetuning_task", "prefix",
    "sep_token_id", "task_specific_params", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "bad_words_ids",
    "begin_suppress_tokens", "num_labels", "is_decoder", "_attn_implementation_autoset", "attn_implementation",
    "_attn_implementation", "use_mamba_kernels", "n_ctx", "num_logits_to_keep", "mamba_inner_layernorms",
    "num_hidden_layers", "shared_expert_intermediate_size", "private_expert_intermediate_size",
    "layers_block_type",
})


@dataclasses.dataclass(frozen=True)
class OTCEConfig(ConfigFields):
    vocab_size: int = 65536
    type_vocab_size: Optional[int] = None
    hidden_size: int = 1024
    intermediate_size: int = 4096
    hidden_bias: bool = False
    hidden_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    output_router_logits: bool = True
    router_aux_loss_coef: float = 0.001
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = False
    # selective SSM (Mamba-1) mixer
    mamba_act: str = "silu"
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 1
    mamba_dt_rank: Union[int, str] = "auto"  # "auto" -> ceil(hidden_size / 16)
    mamba_conv_bias: bool = False
    mamba_proj_bias: bool = False
    mamba_rope: bool = True
    # attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    attention_dropout: float = 0.0
    attention_rope: bool = True
    sliding_window: Optional[int] = None
    # the four stages
    num_observation_layers: int = 12
    num_thinking_layers: int = 2
    num_conseption_layers: int = 9
    num_expression_layers: int = 1
    # cross-domain MoE
    expert_type: Optional[str] = "expansive"
    num_experts: int = 4
    num_experts_per_tok: int = 1
    # wmjax-only
    attention_logn: bool = False

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        err = self._invalid

        def pos_int(f, allow_zero=False):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                err(f, "must be a " + ("non-negative" if allow_zero else "positive") + " integer")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "max_position_embeddings", "mamba_d_state",
                  "mamba_d_conv", "mamba_expand", "num_attention_heads", "num_key_value_heads", "num_experts",
                  "num_experts_per_tok"):
            pos_int(f)
        for f in ("num_observation_layers", "num_thinking_layers", "num_conseption_layers",
                  "num_expression_layers"):
            pos_int(f, allow_zero=True)
        if self.num_hidden_layers < 1:
            err("num_observation_layers", "the four stage counts sum to 0 layers")
        if self.type_vocab_size is not None:
            pos_int("type_vocab_size")
        if not (self.mamba_dt_rank == "auto" or (isinstance(self.mamba_dt_rank, int)
                                                  and not isinstance(self.mamba_dt_rank, bool)
                                                  and self.mamba_dt_rank > 0)):
            err("mamba_dt_rank", "must be 'auto' or a positive integer")
        if self.hidden_act != "silu":
            err("hidden_act", "only 'silu' is used by OTCE")
        if self.mamba_act != "silu":
            err("mamba_act", "only 'silu' is used by OTCE")
        if self.hidden_size % self.num_attention_heads:
            err("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            err("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.attention_rope and self.head_dim % 2:
            err("num_attention_heads", f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if self.mamba_rope and self.mamba_d_state % 2:
            err("mamba_d_state", "must be even when mamba_rope (RoPE rotates pairs)")
        if self.intermediate_size % 2:
            err("intermediate_size", "must be even (the private experts use intermediate_size // 2)")
        if not 0.0 <= self.hidden_dropout < 1.0:
            err("hidden_dropout", "must be in [0, 1)")
        if self.attention_dropout != 0.0:
            err("attention_dropout", "attention-probability dropout is not supported")
        if self.sliding_window is not None:
            err("sliding_window", "upstream applies it only in its (broken) FlashAttention-2 path; not supported")
        if self.rms_norm_eps <= 0:
            err("rms_norm_eps", "must be > 0")
        if self.rope_theta <= 0:
            err("rope_theta", "must be > 0")
        if self.expert_type not in EXPERT_TYPES:
            err("expert_type", f"must be one of {EXPERT_TYPES}")
        if not self.num_experts_per_tok <= self.num_experts:
            err("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        self._check_token_ids()

    # ------------------------------------------------------------------ derived
    @property
    def num_hidden_layers(self) -> int:
        return (self.num_observation_layers + self.num_thinking_layers + self.num_conseption_layers
                + self.num_expression_layers)

    @property
    def is_moe(self) -> bool:
        """True when the MoE layers are the shared MoE (num_experts > 1), as upstream."""
        return self.num_experts > 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_bias_heads(self) -> int:
        """For `wmjax.cache.init_cache`: the KV cache's per-key bias rows (always 0 here: no dynamic mask)."""
        return self.num_key_value_heads

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16) if self.mamba_dt_rank == "auto" else self.mamba_dt_rank

    @property
    def shared_expert_intermediate_size(self) -> int:
        return self.intermediate_size if self.expert_type == "expansive" else self.intermediate_size // 2

    @property
    def private_expert_intermediate_size(self) -> int:
        return self.intermediate_size // 2

    @property
    def stages(self) -> tuple:
        """Per layer: "observation" | "thinking" | "conseption" | "expression"."""
        return (("observation",) * self.num_observation_layers + ("thinking",) * self.num_thinking_layers
                + ("conseption",) * self.num_conseption_layers + ("expression",) * self.num_expression_layers)

    @property
    def layer_types(self) -> tuple:
        """Per layer: "ssm" (observation, conseption) or "attention" (thinking, expression); read by wmjax.cache."""
        return tuple("ssm" if s in ("observation", "conseption") else "attention" for s in self.stages)

    @property
    def moe_layers(self) -> tuple:
        """Per layer: True where the FFN is the shared MoE (upstream `CheemsOTCEModel`: every layer but the first
        observation layer, the last conseption layer and the expression layers), when num_experts > 1."""
        if not self.is_moe:
            return (False,) * self.num_hidden_layers
        out = []
        for i, s in enumerate(self.stages):
            if s == "observation":
                out.append(i > 0)
            elif s == "thinking":
                out.append(True)
            elif s == "conseption":
                j = i - self.num_observation_layers - self.num_thinking_layers
                out.append(j < self.num_conseption_layers - 1)
            else:
                out.append(False)
        return tuple(out)

    def ssm_cache_shape(self, i: int) -> tuple:
        """(heads, head_dim, state_size, conv_width, conv_channels) of SSM layer i's cache (wmjax.cache):
        the state [E, 1, N] (one "head" per inner channel) and the conv's last d_conv - 1 inputs [E]."""
        if self.layer_types[i] != "ssm":
            raise ValueError(f"layer {i} is an attention layer")
        e = self.mamba_inner_size
        return (e, 1, self.mamba_d_state, self.mamba_d_conv, e)

    def replace(self, **changes) -> "OTCEConfig":
        for k in _DERIVED:
            if k in changes and changes[k] != getattr(dataclasses.replace(self, **{
                    c: v for c, v in changes.items() if c not in _DERIVED}), k):
                raise ConfigError(f"OTCEConfig.{k} is derived; set the stage counts / num_experts instead")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k not in _DERIVED})

    # ------------------------------------------------------------------ dict
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OTCEConfig":
        """Build from a dict of wmjax field names (the derived `num_hidden_layers` / `is_moe` may be present if
        they agree); unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(_DERIVED))
        if unknown:
            raise ConfigError(f"unknown OTCEConfig field(s): {unknown}; valid fields: {sorted(names)}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        for k in _DERIVED:
            if k in d and d[k] != getattr(cfg, k):
                raise ConfigError(f"OTCEConfig.{k}={d[k]!r} disagrees with the config ({getattr(cfg, k)!r}); "
                                  "it is derived from " + ("the four stage counts" if k == "num_hidden_layers"
                                                           else "num_experts > 1"))
        return cfg

    # ------------------------------------------------------------------ upstream config.json
    @classmethod
    def from_upstream_dict(cls, d: dict[str, Any], *, strict: bool = True, **overrides) -> "OTCEConfig":
        """Translate an upstream `CheemsOTCEConfig` config.json dict (model_type "cheems", which Cheems also uses:
        an OTCE config is recognised by its stage counts)."""
        d = dict(d)
        mt = d.get("model_type", "cheems")
        if mt not in ("cheems", "otce"):
            raise ConfigError(f"config.json model_type={mt!r}: expected 'cheems' (OTCE)")
        if "num_observation_layers" not in d and mt == "cheems" and strict:
            raise ConfigError("config.json has no num_observation_layers: not an OTCE config (Cheems?)")
        if "eos_token_id" in d:
            d["eos_token_id"] = single_eos(d["eos_token_id"])
        if d.get("mamba_inner_layernorms", True) is False:
            raise ConfigError("mamba_inner_layernorms=False: upstream builds the inner norms anyway; an OTCE "
                              "checkpoint always has them (docs/OTCE.md)")
        out = known_fields(d, {f.name for f in dataclasses.fields(cls)}, _UPSTREAM_IGNORED, strict=strict,
                           message="config.json has field(s) wmjax does not know")
        out.pop("attention_logn", None)
        hidden = out.get("hidden_size", cls.hidden_size)
        if isinstance(hidden, int) and out.get("mamba_dt_rank") == math.ceil(hidden / 16):
            out["mamba_dt_rank"] = "auto"  # upstream stores the resolved rank; same math, round-trips
        out.update(overrides)
        cfg = cls(**out)
        for k in ("shared_expert_intermediate_size", "private_expert_intermediate_size", "num_hidden_layers"):
            if k in d and d[k] is not None and d[k] != getattr(cfg, k):
                raise ConfigError(f"config.json {k}={d[k]!r} disagrees with the sizes it derives from "
                                  f"({getattr(cfg, k)!r}): not an upstream OTCE config")
        return cfg

    def to_upstream_dict(self) -> dict[str, Any]:
        """The config.json dict upstream `CheemsOTCEConfig` reads (model_type "cheems")."""
        d = {k: v for k, v in self.to_dict().items() if k != "attention_logn"}
        d["mamba_dt_rank"] = self.dt_rank
        d.update(architectures=["CheemsOTCEForCausalLM"], model_type="cheems", use_mamba_kernels=True,
                 mamba_inner_layernorms=True, use_cache=False, n_ctx=262144, num_logits_to_keep=None,
                 attn_implementation="sdpa")
        return d



# OTCE publishes no checkpoints (its README); the upstream default config is "OTCE-1B" (~1.05e9 parameters).
# "OTCE-160M" is the wmjax training size of configs/otce-160m.yaml.
PRESETS: dict[str, dict[str, Any]] = {
    "OTCE-1B": dict(),
    # 163.6M unique parameters (untied 32768-token vocab): d 512, I 1536, 18 layers in the default 12:2:9:1-like
    # proportions (9 observe, 2 think, 6 conceive, 1 express), 8 heads / 4 kv heads, N 64, dt_rank 32
    "OTCE-160M": dict(vocab_size=32768, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                      num_key_value_heads=4, mamba_d_state=64, num_observation_layers=9, num_thinking_layers=2,
                      num_conseption_layers=6, num_expression_layers=1, expert_type="expansive", num_experts=4,
                      max_position_embeddings=4096),
}
