"""Doge (SmallDoge) causal LM: the `transformers.DogeForCausalLM` math in Flax linen.

    h_0 = embed_tokens[ids]
    per layer:  h = input_residual * h + DMA(RMSNorm(h))
                h = post_attention_residual * h + FFN(RMSNorm(h))      FFN = MLP or CDMoE (config.is_moe)
    logits = RMSNorm(h_L) @ E^T  (tied) or lm_head

Used functionally: `logits, cache = model.apply({"params": params}, input_ids, positions, cache)`.
Params are a plain nested dict named like the HF modules (`model/layers_{i}/self_attn/q_proj/kernel` ...), so
conversion is flatten, rename, transpose (wmjax.convert). With `output_router_logits` (MoE), the per-layer
router logits and HF's load-balancing loss are sown into the "intermediates" collection
(`router_logits`, `router_aux_loss`).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from wmjax.cache import init_cache
from wmjax.config import DogeConfig
from wmjax.layers.attention import DynamicMaskAttention
from wmjax.layers.mlp import MLP
from wmjax.layers.moe import CDMoE, router_aux_loss
from wmjax.layers.norm import RMSNorm, scale_by_weight
from wmjax.layers.rope import rope_cos_sin
from wmjax.models.causal_lm import (ACT_AXES, call_inputs, embedding, init_fn, layerwise_init, lm_head, lm_output,
                                    logical_axes, random_params, run_layers, stacked_layer_init, zero_pad_row)
from wmjax.models.registry import Family

__all__ = ["DogeDecoderLayer", "DogeModel", "DogeForCausalLM", "init_params", "param_logical_axes", "FAMILY"]


class DogeDecoderLayer(nn.Module):
    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, h, rope_cos, rope_sin, positions, token_mask, segment_ids=None, layer_cache=None,
                 cache_length=None, deterministic=True, compute_aux=False):
        cfg = self.config
        residual_init = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
        norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype,
                                    name=name)
        attn_out, layer_cache = DynamicMaskAttention(cfg, self.dtype, self.param_dtype, self.attention_impl,
                                                     name="self_attn")(
            norm("input_layernorm")(h), rope_cos, rope_sin, positions, token_mask, segment_ids, layer_cache,
            cache_length)
        attn_out = nn.Dropout(cfg.hidden_dropout)(attn_out, deterministic=deterministic)
        w_in = self.param("input_residual", residual_init, (cfg.hidden_size,), self.param_dtype)
        h = scale_by_weight(w_in, h, self.dtype) + attn_out
        h = nn.with_logical_constraint(h, ACT_AXES)

        m = norm("post_attention_layernorm")(h)
        stats = None
        if cfg.is_moe:
            ffn, stats = CDMoE(cfg, self.dtype, self.param_dtype, name="mlp")(m, token_mask, compute_aux)
        else:
            ffn = MLP(cfg, self.dtype, self.param_dtype, name="mlp")(m)
        ffn = nn.Dropout(cfg.hidden_dropout)(ffn, deterministic=deterministic)
        w_post = self.param("post_attention_residual", residual_init, (cfg.hidden_size,), self.param_dtype)
        h = scale_by_weight(w_post, h, self.dtype) + ffn
        return nn.with_logical_constraint(h, ACT_AXES), layer_cache, stats


class DogeModel(nn.Module):
    """Embedding + decoder layers + final norm. Returns (hidden [b, s, hidden], cache)."""

    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = embedding(cfg, self.dtype, self.param_dtype)
        layer_cls = DogeDecoderLayer
        if self.remat:
            layer_cls = nn.remat(DogeDecoderLayer, static_argnums=(9, 10))  # (self, ...): deterministic, compute_aux
        self.layers = [layer_cls(cfg, self.dtype, self.param_dtype, self.attention_impl)
                       for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions, token_mask, segment_ids=None, cache=None, deterministic=True,
                 compute_aux=False):
        cfg = self.config
        h = self.embed_tokens(input_ids)
        h = nn.with_logical_constraint(h, ACT_AXES)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                                cfg.max_position_embeddings, dtype=self.dtype)
        h, cache, stats = run_layers(self.layers, h, cache, lambda layer, h, layer_cache, length: layer(
            h, cos, sin, positions, token_mask, segment_ids, layer_cache, length, deterministic, compute_aux))
        return self.norm(h), cache, stats

    def attend(self, h):
        return self.embed_tokens.attend(h)


class DogeForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids [b, s], positions=None, cache=None, attention_mask=None,
    segment_ids=None) -> (logits [b, s, vocab] f32, cache)`.

    positions default to arange(s) (+ cache length when decoding); attention_mask [b, s] (1 = real token);
    segment_ids [b, s] restrict attention to the same packed document.
    With ``return_hidden=True`` it returns (hidden [b, s, hidden] after the final norm, in the compute dtype,
    cache) instead of the logits, for losses that apply the LM head themselves
    (``wmjax.ops.cross_entropy.lm_head_cross_entropy`` with :meth:`lm_head_weight`).
    """

    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    remat: bool = False

    def setup(self):
        self.model = DogeModel(self.config, self.dtype, self.param_dtype, self.attention_impl, self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = lm_head(self.config, self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, segment_ids=None,
                 deterministic=True, output_router_logits=None, return_hidden=False):
        cfg = self.config
        positions, token_mask = call_inputs(input_ids, positions, cache, attention_mask)
        compute_aux = cfg.is_moe and bool(cfg.output_router_logits if output_router_logits is None
                                          else output_router_logits)
        h, cache, stats = self.model(input_ids, positions, token_mask, segment_ids, cache, deterministic,
                                     compute_aux)
        if stats:
            self.sow("intermediates", "router_aux_loss",
                     router_aux_loss(stats, cfg.num_experts, cfg.num_experts_per_tok))
        return lm_output(self, h, cache, return_hidden)

    @staticmethod
    def lm_head_weight(config: DogeConfig, params):
        """-> (weight, layout) of the LM head in a params dict: the tied embedding [V, d] ("vd") or the lm_head
        kernel [d, V] ("dv"); ``hidden @ weight`` (transposed for "vd") are the model's logits."""
        if config.tie_word_embeddings:
            return params["model"]["embed_tokens"]["embedding"], "vd"
        return params["lm_head"]["kernel"], "dv"


def _init_fn(config: DogeConfig, param_dtype):
    return init_fn(DogeForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype, attention_impl="reference"))


def init_params(config: DogeConfig, rng, param_dtype=jnp.float32):
    """Random params as HF's `_init_weights` (N(0, initializer_range), norms/residuals 1, A 0, biases 0;
    the pad row of embed_tokens zeroed): a plain nested dict.

    The decoder layers are drawn by one layer init `vmap`ped over per-layer keys, so the compiled init holds each
    random draw once instead of once per layer (fewer fusions to compile: docs/benchmarks-history.md, Training).
    The embedding, final norm and untied head come from the model's own init with one layer (that layer is
    discarded)."""
    layer = DogeDecoderLayer(config, jnp.float32, param_dtype, "reference")
    init = layerwise_init(_init_fn(config.replace(num_hidden_layers=1), param_dtype),
                          lambda kind, count: stacked_layer_init(layer, count, config.hidden_size, config.head_dim),
                          ("decoder",) * config.num_hidden_layers, ("decoder",))
    return zero_pad_row(random_params(init, rng), ("model", "embed_tokens", "embedding"), config.pad_token_id)


def param_logical_axes(config: DogeConfig):
    """Same structure as the params; each leaf a tuple of logical axis names (e.g. ("embed", "mlp"))."""
    return logical_axes(_init_fn(config, jnp.float32))


def describe(config: DogeConfig) -> str:
    return (f"Doge, {config.num_hidden_layers} layers, d={config.hidden_size}, vocab={config.vocab_size}"
            f"{', CDMoE' if config.is_moe else ''}")


FAMILY = Family(name="doge", config_cls=DogeConfig, model_cls=DogeForCausalLM, init_params=init_params,
                param_logical_axes=param_logical_axes, init_cache=init_cache, describe=describe)
