"""Om LLM (ARCformer) configuration: a frozen, validated dataclass mirroring the `OmLLM` constructor of
dingo-actual/om (shared/research/om_arc.md §6.1), under the wmjax family-contract field names.

Upstream name -> field: num_layers -> num_hidden_layers, dim_input -> hidden_size, dim_hidden ->
intermediate_size, num_heads -> num_attention_heads, activation -> hidden_act, init_ngrams -> ngram_sizes,
dropout -> hidden_dropout, pad_id -> pad_token_id; dims_key, dims_value, segment_len, state_len, scaling_factors,
attn_dropout, attn_logit_dropout, attn_proj_rank and mlp_1221 keep their names.

Branches (docs/OM.md): the defaults are the `main` branch model (commit 83ff1f2): post-LayerNorm ARCformer with
the state LayerNorm, MLP biases, fixed per-pass attention scales, plain causal mask over [state; segment; state].
The `heavyball` branch is the set of flags qkv_norm=True, attn_norm=False, state_norm=False, mlp_norm="rmsnorm",
mlp_bias=False, end_attends_start=False, zero_pad_embeddings=True (`preset("om-300m-heavyball")`), implementing
what its edits intended (every q/k/v row unit-normalized, the trailing state not attending to the leading one).

RoPE (`rope`): "om_compat" is the original's frequencies theta_i = base^(-2i) (i = 1..eff/2; almost the
identity; for parity with converted checkpoints); "standard" is RoFormer theta_i = base^(-2(i-1)/eff) on the
same rotated features (the default, for new training); "none" applies no rotation. Both rotate interleaved pairs
of the first eff = ceil(dims_key[p] * rope_pct) features at 1-based positions over [state; segment; state].
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional, Tuple

from wmjax.config import ConfigError, ConfigFields, known_fields

__all__ = ["OmConfig", "PRESETS", "ConfigError", "ROPE_KINDS", "ACTIVATIONS"]

ROPE_KINDS = ("standard", "om_compat", "none")
ACTIVATIONS = ("gelu", "relu", "abs")
_NORMS = ("layernorm", "rmsnorm")
_BRANCHES = ("main", "heavyball")


@dataclasses.dataclass(frozen=True)
class OmConfig(ConfigFields):
    vocab_size: int = 50259
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    dims_key: Tuple[int, ...] = (256, 128, 64)
    dims_value: Tuple[int, ...] = (256, 128, 64)
    attn_proj_rank: int = 64  # <= 0 -> hidden_size // num_attention_heads (as ARCformer)
    segment_len: int = 512
    state_len: int = 64
    ngram_sizes: Tuple[int, ...] = (2, 3)
    hidden_act: str = "gelu"
    mlp_1221: bool = False
    # None -> 1/sqrt(dims_key[p]); main's config: 1/sqrt(2 dk_0), 1/sqrt(dk_1), 1/sqrt(dk_2 / 2)
    scaling_factors: Optional[Tuple[float, ...]] = (0.04419417382415922, 0.08838834764831845, 0.1767766952966369)
    rope: str = "standard"
    rope_theta: float = 10000.0
    rope_pct: float = 0.5
    hidden_dropout: float = 0.0  # after the MLP (upstream `dropout`)
    attn_dropout: float = 0.0  # on the ARC output before the residual
    attn_logit_dropout: float = 0.0  # on the attention probabilities
    layer_norm_eps: float = 1e-5
    # heavyball flags (main values as defaults)
    qkv_norm: bool = False  # unit-norm q/k/v rows, learnable per-head scale (init scaling_factors[p])
    attn_norm: bool = True  # post-LayerNorm on the attention sublayer
    state_norm: bool = True  # LayerNorm on the next state
    mlp_norm: str = "layernorm"  # "layernorm" | "rmsnorm" (weight only) after the MLP sublayer
    mlp_bias: bool = True
    end_attends_start: bool = True  # trailing state rows see the leading state rows (plain causal mask)
    zero_pad_embeddings: bool = False  # multiply the embeddings of pad_token_id by 0 (before the n-grams)
    # family contract
    max_position_embeddings: int = 8192  # no limit of the model (positions restart every segment); a hint only
    pad_token_id: Optional[int] = None  # also the look-back context before the first token (None -> id 0)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    tie_word_embeddings: bool = False
    initializer_range: float = math.sqrt(0.4)  # the embedding's init std (upstream: sqrt(2/5))
    is_moe: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self):
        for f in ("dims_key", "dims_value", "ngram_sizes", "scaling_factors"):
            v = getattr(self, f)
            if isinstance(v, list):
                object.__setattr__(self, f, tuple(v))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        err = self._invalid

        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "segment_len", "state_len", "max_position_embeddings"):
            if not pos_int(getattr(self, f)):
                err(f, "must be a positive integer")
        for f in ("dims_key", "dims_value"):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v or not all(pos_int(x) for x in v):
                err(f, "must be a non-empty list of positive integers (one per memory pass)")
        if len(self.dims_key) != len(self.dims_value):
            err("dims_value", f"must have one entry per pass, as dims_key ({len(self.dims_key)})")
        if not isinstance(self.attn_proj_rank, int) or isinstance(self.attn_proj_rank, bool):
            err("attn_proj_rank", "must be an integer (<= 0: hidden_size // num_attention_heads)")
        if self.attn_proj_rank <= 0 and self.hidden_size % self.num_attention_heads:
            err("attn_proj_rank", "<= 0 needs hidden_size divisible by num_attention_heads")
        ng = self.ngram_sizes
        if not isinstance(ng, tuple) or not ng or not all(pos_int(k) and k >= 2 for k in ng):
            err("ngram_sizes", "must be a non-empty list of window sizes >= 2 (upstream init_ngrams; [] crashes "
                "upstream)")
        if list(ng) != sorted(set(ng)):
            err("ngram_sizes", "must be sorted and distinct (upstream builds the modules in the given order)")
        for k in ng:
            if self.hidden_size // k <= 0:
                err("ngram_sizes", f"window {k} leaves rank hidden_size // {k} = 0")
        if self.hidden_act not in ACTIVATIONS:
            err("hidden_act", f"must be one of {ACTIVATIONS} (upstream's GLU activations are broken; swish's "
                "learnable beta is not ported)")
        if self.mlp_1221 and self.intermediate_size % 2:
            err("intermediate_size", "must be even with mlp_1221")
        if self.scaling_factors is not None:
            sf = self.scaling_factors
            if not isinstance(sf, tuple) or len(sf) != len(self.dims_key) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in sf):
                err("scaling_factors", f"must be None or {len(self.dims_key)} positive numbers (one per pass)")
        if self.rope not in ROPE_KINDS:
            err("rope", f"must be one of {ROPE_KINDS}")
        if self.rope_theta <= 0:
            err("rope_theta", "must be > 0")
        if not 0.0 < self.rope_pct <= 1.0:
            err("rope_pct", "must be in (0, 1]")
        if self.rope != "none":
            for dk in self.dims_key:
                if self.rope_features(dk) % 2:
                    err("dims_key", f"ceil({dk} * rope_pct) = {self.rope_features(dk)} rotated features must be "
                        "even (RoPE rotates pairs)")
        for f in ("hidden_dropout", "attn_dropout", "attn_logit_dropout"):
            if not 0.0 <= getattr(self, f) < 1.0:
                err(f, "must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            err("layer_norm_eps", "must be > 0")
        if self.mlp_norm not in _NORMS:
            err("mlp_norm", f"must be one of {_NORMS}")
        if self.is_moe:
            err("is_moe", "Om has no mixture of experts")
        self._check_token_ids()
        if self.initializer_range <= 0:
            err("initializer_range", "must be > 0")

    # ------------------------------------------------------------------ derived
    @property
    def num_passes(self) -> int:
        return len(self.dims_key)

    @property
    def proj_rank(self) -> int:
        """r: per-head width fed to the output projections."""
        return self.attn_proj_rank if self.attn_proj_rank > 0 else self.hidden_size // self.num_attention_heads

    @property
    def context_len(self) -> int:
        """d = max(ngram_sizes) - 1: look-back tokens the n-gram features read before a segment."""
        return max(self.ngram_sizes) - 1

    @property
    def context_token_id(self) -> int:
        """The look-back token before the first real token (upstream prepends d pad tokens)."""
        return 0 if self.pad_token_id is None else self.pad_token_id

    def rope_features(self, dk: int) -> int:
        """eff = ceil(dk * rope_pct): leading features RoPE rotates."""
        return int(math.ceil(dk * self.rope_pct))

    def scale(self, p: int) -> float:
        """The attention scale of pass p (the initial value of the learnable per-head scale with qkv_norm)."""
        return float(self.scaling_factors[p]) if self.scaling_factors is not None else 1.0 / math.sqrt(
            self.dims_key[p])

    @property
    def branch(self) -> str:
        """"main" or "heavyball" when the flags are exactly one branch's, else "custom"."""
        for name in _BRANCHES:
            if all(getattr(self, k) == v for k, v in _BRANCH_FLAGS[name].items()):
                return name
        return "custom"

    # ------------------------------------------------------------------ dict / upstream
    @classmethod
    def from_upstream_dict(cls, d: dict[str, Any], *, branch: Optional[str] = None, strict: bool = True,
                           **overrides) -> "OmConfig":
        """Translate the `OmLLM` kwargs (dingo-actual/om `config/model.json`) to an OmConfig.

        branch: "main" | "heavyball" | None (detected: `num_iters` / `stacked_attn` -> main, `stacked` /
        `xformers_override` / `pad_id` -> heavyball). `position_embedders`: null -> rope="none", else "om_compat"
        (the original RoPE; its seq_len / num_dims are not model math). Paths wmjax does not port are an error
        naming them: diff_attn, cope, Hopfield passes (num_iters > 1), unstacked layout, GLU / swish activations.
        """
        d = dict(d)
        extra = dict(d.pop("wmjax", None) or {})
        if branch is None:
            branch = "heavyball" if any(k in d for k in ("stacked", "xformers_override", "pad_id")) and \
                "num_iters" not in d else "main"
        if branch not in _BRANCHES:
            raise ConfigError(f"branch={branch!r}: expected one of {_BRANCHES}")
        out: dict[str, Any] = dict(_BRANCH_FLAGS[branch])
        if d.pop("diff_attn", False):
            raise ConfigError("upstream diff_attn=True: differential attention is broken upstream and not ported")
        if d.pop("cope", False):
            raise ConfigError("upstream cope=True: CoPE (leaks future tokens upstream) is not ported")
        iters = d.pop("num_iters", None)
        if iters is not None and any(int(n) != 1 for n in iters):
            raise ConfigError(f"upstream num_iters={iters}: Hopfield passes (num_iters > 1) are not ported")
        for k in ("stacked_attn", "stacked"):
            if k in d and not d.pop(k):
                raise ConfigError(f"upstream {k}=False: the unstacked parameter layout is not ported (same math; "
                                  "convert with stacked weights)")
        d.pop("xformers_override", None)
        pe = d.pop("position_embedders", "absent")
        if pe is None or (isinstance(pe, (list, tuple)) and all(x is None for x in pe)):
            out["rope"] = "none"
        else:
            out["rope"] = "om_compat"
            if isinstance(pe, (list, tuple)) and pe and isinstance(pe[0], dict):
                if "base" in pe[0]:
                    out["rope_theta"] = float(pe[0]["base"])
                if "dim_embedding_pct" in pe[0]:
                    out["rope_pct"] = float(pe[0]["dim_embedding_pct"])
        rename = {"num_layers": "num_hidden_layers", "dim_input": "hidden_size", "dim_hidden": "intermediate_size",
                  "num_heads": "num_attention_heads", "activation": "hidden_act", "init_ngrams": "ngram_sizes",
                  "dropout": "hidden_dropout", "pad_id": "pad_token_id"}
        same = {"vocab_size", "dims_key", "dims_value", "segment_len", "state_len", "scaling_factors",
                "attn_dropout", "attn_logit_dropout", "attn_proj_rank", "mlp_1221"}
        out.update(known_fields(d, same, _UPSTREAM_IGNORED, strict=strict, rename=rename,
                                message="upstream OmLLM config has key(s) wmjax does not know"))
        if "ngram_sizes" in out:
            out["ngram_sizes"] = tuple(sorted(out["ngram_sizes"]))
        if "hidden_act" in out and out["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"upstream activation={out['hidden_act']!r}: only {ACTIVATIONS} are ported (GLU "
                              "variants are broken upstream; swish has an unported learnable beta)")
        out.setdefault("attn_proj_rank", -1)
        out.setdefault("hidden_dropout", 0.0)
        out.setdefault("attn_dropout", 0.0)
        out.setdefault("attn_logit_dropout", 0.0)
        out.setdefault("mlp_1221", False)
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(extra) - names)
        if bad:
            raise ConfigError(f"upstream config 'wmjax' entry has unknown OmConfig field(s): {bad}")
        out.update(extra)
        out.update(overrides)
        return cls(**out)

    def to_upstream_dict(self) -> dict[str, Any]:
        """The `OmLLM` kwargs of this config, plus "model_type": "om" and a "wmjax" entry with the fields upstream
        has no kwarg for (token ids, max_position_embeddings, initializer_range, layer_norm_eps, rope_theta /
        rope_pct, and rope / tie_word_embeddings / the branch flags where they differ from what upstream does):
        pop both before `OmLLM(**d)`. `position_embedders` is one {dim, seq_len, num_dims, base,
        dim_embedding_pct} per pass, the arguments `pretrain_stage.py` builds RoPEEmbeddings from.
        `from_upstream_dict(to_upstream_dict())` is the identity. rope="standard" and mixed branch flags have no
        upstream equivalent (a warning says so; tie_word_embeddings=True is written as an untied copy)."""
        branch = self.branch
        up_branch = "main" if branch == "custom" else branch
        extra: dict[str, Any] = {k: getattr(self, k) for k in (
            "pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings", "initializer_range",
            "layer_norm_eps", "rope_theta", "rope_pct")}
        problems = []
        if branch == "custom":
            extra.update({k: getattr(self, k) for k in _BRANCH_FLAGS["main"]})
            problems.append("mixed main/heavyball flags")
        if self.rope == "standard":
            extra["rope"] = "standard"
            problems.append("rope='standard' (upstream RoPE is om_compat)")
        if self.tie_word_embeddings:  # upstream's untied head gets a copy of the embedding (layout_om)
            extra["tie_word_embeddings"] = True
        if problems:
            warnings.warn(f"OmConfig.to_upstream_dict: {', '.join(problems)} has no upstream equivalent: the "
                          "upstream model would compute something else; wmjax reads it back from the 'wmjax' "
                          "entry", stacklevel=2)
        n = self.segment_len + 2 * self.state_len
        pe = None if self.rope == "none" else [
            {"dim": dk, "seq_len": n, "num_dims": 4, "base": self.rope_theta, "dim_embedding_pct": self.rope_pct}
            for dk in self.dims_key]
        d = {
            "model_type": "om",
            "num_layers": self.num_hidden_layers, "vocab_size": self.vocab_size, "dim_input": self.hidden_size,
            "dim_hidden": self.intermediate_size, "dims_key": list(self.dims_key),
            "dims_value": list(self.dims_value), "num_heads": self.num_attention_heads,
            "activation": self.hidden_act, "segment_len": self.segment_len, "state_len": self.state_len,
            "cope": False, "position_embedders": pe,
            "scaling_factors": None if self.scaling_factors is None else list(self.scaling_factors),
            "dropout": self.hidden_dropout, "diff_attn": False, "attn_dropout": self.attn_dropout,
            "attn_logit_dropout": self.attn_logit_dropout, "attn_proj_rank": self.attn_proj_rank,
            "init_ngrams": list(self.ngram_sizes), "mlp_1221": self.mlp_1221,
        }
        if up_branch == "main":
            d["num_iters"] = [1] * self.num_passes
            d["stacked_attn"] = True
        else:
            d["stacked"] = True
            d["pad_id"] = self.context_token_id
            d["xformers_override"] = False
        d["wmjax"] = extra
        return d


# keys of a written config.json that carry no model math (save_hf adds "dtype")
_UPSTREAM_IGNORED = frozenset({"model_type", "dtype", "torch_dtype", "architectures", "transformers_version"})

_BRANCH_FLAGS: dict[str, dict[str, Any]] = {
    "main": dict(qkv_norm=False, attn_norm=True, state_norm=True, mlp_norm="layernorm", mlp_bias=True,
                 end_attends_start=True, zero_pad_embeddings=False),
    "heavyball": dict(qkv_norm=True, attn_norm=False, state_norm=False, mlp_norm="rmsnorm", mlp_bias=False,
                      end_attends_start=False, zero_pad_embeddings=True),
}

# main `config/model.json` (om_arc.md §6.1): 298,403,840 parameters. pad 50258 = `<|pad|>` of the Om tokenizer.
_MAIN = dict(vocab_size=50259, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
             num_attention_heads=8, dims_key=(256, 128, 64), dims_value=(256, 128, 64), attn_proj_rank=64,
             segment_len=512, state_len=64, ngram_sizes=(2, 3), hidden_act="gelu", mlp_1221=False,
             scaling_factors=(0.04419417382415922, 0.08838834764831845, 0.1767766952966369), rope="om_compat",
             hidden_dropout=0.1, attn_dropout=0.1, attn_logit_dropout=0.0, pad_token_id=50258,
             bos_token_id=50257, eos_token_id=50256, max_position_embeddings=8192)

PRESETS: dict[str, dict[str, Any]] = {
    "om-300m": dict(_MAIN, **_BRANCH_FLAGS["main"]),
    "om-300m-heavyball": dict(_MAIN, **_BRANCH_FLAGS["heavyball"]),
}
