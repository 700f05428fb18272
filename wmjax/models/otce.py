"""OTCE causal LM (Observer-Thinker-Conceiver-Expresser; LoserCheems/OTCE `CheemsOTCEForCausalLM`, intended
behaviour; /work/shared/research/ssd_cheems_otce.md §2; docs/OTCE.md) in Flax linen.

    h_0 = word_embeddings[ids] (+ token_type_embeddings[0] if type_vocab_size)
    observation / conseption layer (SSM):   h = h + Mamba(RMSNorm(h));   h = h + FFN(RMSNorm(h))
    thinking layer (attention):             h = h + Attn(RMSNorm(h));    h = h + FFN(RMSNorm(h))
    expression layer (attention):           h1 = x + Attn(RMSNorm_in(x)); h2 = h1 + MLP(RMSNorm_ff(h1))
                                            out = projection(silu(dense(RMSNorm_dense(h2) + x)))   (no residual)
    logits = lm_head(RMSNorm_final(h_L))    (f32)

FFN = `SharedMoE` where `config.moe_layers` says so, else the dense `TanhGatedMLP` (intermediate_size). Every
RMSNorm has a bias. Mamba = `wmjax.layers.selective_mixer.SelectiveMixer` (RoPE of B/C over dim N), Attn =
`wmjax.layers.causal_attention.CausalAttention` (GQA, RoPE over head_dim).

`logits, cache = model.apply({"params": p}, input_ids [b, s], positions=None, cache=None, attention_mask=None,
segment_ids=None, deterministic=True, output_router_logits=None, return_hidden=False)`; cache from
`init_cache(config, b, max_length)` (`wmjax.cache`: KV caches for attention layers, conv + SSM state for SSM
layers). Params are a plain nested dict named like the upstream modules (`model/layers_{i}/mamba/in_proj/kernel`,
...; wmjax/convert/layout_otce.py). With output_router_logits (default config.output_router_logits) and MoE
layers, the load-balancing loss over every MoE layer's router is sown as "router_aux_loss".
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.cache import init_cache as _init_cache
from wmjax.configs.otce import OTCEConfig
from wmjax.layers.causal_attention import CausalAttention
from wmjax.layers.linear import dense
from wmjax.layers.moe import router_aux_loss
from wmjax.layers.norm import RMSNorm
from wmjax.layers.rope import rope_cos_sin
from wmjax.layers.selective_mixer import SelectiveMixer
from wmjax.layers.shared_moe import SharedMoE, TanhGatedMLP
from wmjax.models.causal_lm import (ACT_AXES, call_inputs, embedding, init_fn, lm_head, lm_output, logical_axes,
                                    random_params, run_layers, zero_pad_row)
from wmjax.models.registry import Family

__all__ = ["OTCEDecoderLayer", "OTCEModel", "OTCEForCausalLM", "init_params", "param_logical_axes", "init_cache",
           "describe", "FAMILY"]


class OTCEDecoderLayer(nn.Module):
    """One layer of stage `config.stages[index]`. Returns (h, new layer cache or None, MoE statistics or None)."""

    config: OTCEConfig
    index: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    scan_impl: Optional[str] = None

    @nn.compact
    def __call__(self, h, attn_cos, attn_sin, ssm_cos, ssm_sin, positions, token_mask, segment_ids=None,
                 layer_cache=None, cache_length=None, deterministic=True, compute_aux=False):
        cfg = self.config
        stage = cfg.stages[self.index]
        norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype,
                                    use_bias=True, name=name)
        x = h
        u = norm("input_layernorm")(h)
        if stage in ("observation", "conseption"):
            mixed, layer_cache = SelectiveMixer(cfg, self.dtype, self.param_dtype, self.scan_impl, name="mamba")(
                u, ssm_cos, ssm_sin, positions, token_mask, segment_ids, layer_cache)
        else:
            attn = CausalAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   cfg.hidden_bias, cfg.initializer_range, cfg.attention_rope, cfg.attention_logn,
                                   self.dtype, self.param_dtype, self.attention_impl,
                                   name="self_attn" if stage == "thinking" else "self_attention")
            mixed, layer_cache = attn(u, attn_cos, attn_sin, positions, token_mask, segment_ids, layer_cache,
                                      cache_length)
        h = nn.with_logical_constraint(h + mixed, ACT_AXES)

        m = norm("pre_ff_layernorm")(h)
        stats = None
        if cfg.moe_layers[self.index]:
            ffn, stats = SharedMoE(cfg, self.dtype, self.param_dtype, name="feed_forward")(m, token_mask,
                                                                                           compute_aux)
        else:
            ffn = TanhGatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_bias, cfg.initializer_range,
                               self.dtype, self.param_dtype, name="feed_forward")(m)
        h = nn.with_logical_constraint(h + ffn, ACT_AXES)

        if stage == "expression":  # the projection replaces the residual stream
            mk = lambda name, axes: dense(cfg.hidden_size, axes, use_bias=cfg.hidden_bias,
                                          init_std=cfg.initializer_range, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=name)
            e = mk("dense", ("embed", "mlp"))(norm("pre_dense_layernorm")(h) + x)
            e = nn.Dropout(cfg.hidden_dropout)(jax.nn.silu(e), deterministic=deterministic)
            h = nn.with_logical_constraint(mk("projection", ("mlp", "embed"))(e), ACT_AXES)
        return h, layer_cache, stats


class _Embedding(nn.Module):
    """Upstream `Embedding`: word_embeddings (+ token_type_embeddings row 0: OTCE's token_type_ids default)."""

    config: OTCEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.word_embeddings = embedding(cfg, self.dtype, self.param_dtype)
        if cfg.type_vocab_size is not None:
            self.token_type_embeddings = embedding(cfg, self.dtype, self.param_dtype, cfg.type_vocab_size)

    def __call__(self, input_ids):
        h = self.word_embeddings(input_ids)
        if self.config.type_vocab_size is not None:
            h = h + self.token_type_embeddings(jnp.zeros_like(input_ids))
        return h

    def attend(self, h):
        return self.word_embeddings.attend(h)


class OTCEModel(nn.Module):
    """Embedding + decoder layers + final norm. Returns (hidden [b, s, d], cache, MoE statistics)."""

    config: OTCEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    scan_impl: Optional[str] = None
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = _Embedding(cfg, self.dtype, self.param_dtype)
        layer_cls = OTCEDecoderLayer
        if self.remat:  # (self, ...): deterministic, compute_aux
            layer_cls = nn.remat(OTCEDecoderLayer, static_argnums=(11, 12))
        self.layers = [layer_cls(cfg, i, self.dtype, self.param_dtype, self.attention_impl, self.scan_impl)
                       for i in range(cfg.num_hidden_layers)]
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype,
                                       use_bias=True)

    def __call__(self, input_ids, positions, token_mask, segment_ids=None, cache=None, deterministic=True,
                 compute_aux=False):
        cfg = self.config
        h = nn.with_logical_constraint(self.embed_tokens(input_ids), ACT_AXES)
        attn_cos, attn_sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype=self.dtype)
        ssm_cos, ssm_sin = rope_cos_sin(positions, cfg.mamba_d_state, cfg.rope_theta, dtype=self.dtype)
        h, cache, stats = run_layers(self.layers, h, cache, lambda layer, h, layer_cache, length: layer(
            h, attn_cos, attn_sin, ssm_cos, ssm_sin, positions, token_mask, segment_ids, layer_cache, length,
            deterministic, compute_aux))
        return self.final_layernorm(h), cache, stats

    def attend(self, h):
        return self.embed_tokens.attend(h)


class OTCEForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids [b, s], positions=None, cache=None, attention_mask=None,
    segment_ids=None) -> (logits [b, s, vocab] f32, cache)`.

    positions default to arange(s) (+ cache length when decoding); attention_mask [b, s] (1 = real token; pads
    never touch the SSM / conv state and are never attended to); segment_ids [b, s] (packed documents: attention
    restricted to the document, conv taps and SSM state reset at document starts; not with a cache).
    ``return_hidden=True`` returns (hidden after the final norm, cache) for losses that apply the head
    themselves (:meth:`lm_head_weight`).
    """

    config: OTCEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    scan_impl: Optional[str] = None

    def setup(self):
        cfg = self.config
        self.model = OTCEModel(cfg, self.dtype, self.param_dtype, self.attention_impl, self.scan_impl, self.remat)
        if not cfg.tie_word_embeddings:
            self.lm_head = lm_head(cfg, self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, segment_ids=None,
                 deterministic=True, output_router_logits=None, return_hidden=False):
        cfg = self.config
        positions, token_mask = call_inputs(input_ids, positions, cache, attention_mask)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are not supported together with a decode cache")
        compute_aux = cfg.is_moe and any(cfg.moe_layers) and bool(
            cfg.output_router_logits if output_router_logits is None else output_router_logits)
        h, cache, stats = self.model(input_ids, positions, token_mask, segment_ids, cache, deterministic,
                                     compute_aux)
        if stats:
            total = tuple(sum(s_[j] for s_ in stats) for j in range(3))
            # top_k=1: Mixtral's loss sums (not averages) the k selection slots' fractions (shared_moe.py)
            self.sow("intermediates", "router_aux_loss", router_aux_loss([total], cfg.num_experts, 1))
        return lm_output(self, h, cache, return_hidden)

    @staticmethod
    def lm_head_weight(config: OTCEConfig, params):
        """-> (weight, "vd" | "dv"): the tied word embedding [V, d] or the lm_head kernel [d, V]."""
        if config.tie_word_embeddings:
            return params["model"]["embed_tokens"]["word_embeddings"]["embedding"], "vd"
        return params["lm_head"]["kernel"], "dv"


def _init_fn(config: OTCEConfig, param_dtype):
    return init_fn(OTCEForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype, attention_impl="reference"))


def init_params(config: OTCEConfig, rng, param_dtype=jnp.float32):
    """Random params as upstream's `_init_weights` (Linear / Conv1d / Embedding N(0, initializer_range), biases 0,
    the pad row of the word embedding zeroed; A_log = log(1..N), D = 1, norms weight 1 bias 0): a plain nested
    dict."""
    return zero_pad_row(random_params(_init_fn(config, param_dtype), rng),
                        ("model", "embed_tokens", "word_embeddings", "embedding"), config.pad_token_id)


def param_logical_axes(config: OTCEConfig):
    """Same structure as the params; each leaf a tuple of logical axis names."""
    return logical_axes(_init_fn(config, jnp.float32))


def init_cache(config: OTCEConfig, batch: int, max_length: int, dtype=jnp.float32, kind: str = "full",
               multiple_of: int = 1):
    """Empty decode cache (`wmjax.cache.init_cache`): a KV cache of max_length slots per attention layer, an
    `SSMCache` (state [b, E, 1, N] f32, conv inputs [b, d_conv - 1, E]) per SSM layer. Only kind="full": OTCE has
    no dynamic mask, so the bounded dynamic-mask cache does not apply."""
    if kind != "full":
        raise ValueError(f"OTCE init_cache: kind={kind!r}; only 'full' (OTCE attention has no dynamic mask, so the "
                         "bounded dynamic-mask cache does not apply)")
    return _init_cache(config, batch, max_length, dtype, kind, multiple_of)


def describe(config: OTCEConfig) -> str:
    c = config
    moe = f", {c.expert_type} MoE x{c.num_experts} in {sum(c.moe_layers)} layers" if any(c.moe_layers) else ""
    return (f"OTCE, {c.num_hidden_layers} layers ({c.num_observation_layers} observe ssm, {c.num_thinking_layers} "
            f"think attn, {c.num_conseption_layers} conceive ssm, {c.num_expression_layers} express attn), "
            f"d={c.hidden_size}, vocab={c.vocab_size}{moe}")


FAMILY = Family(name="otce", config_cls=OTCEConfig, model_cls=OTCEForCausalLM, init_params=init_params,
                param_logical_axes=param_logical_axes, init_cache=init_cache, describe=describe)
