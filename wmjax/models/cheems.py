"""Cheems causal LM (WonderfulMatrices `CheemsForCausalLM`; /work/shared/research/ssd_cheems_otce.md 1.3), a hybrid
of the Cheems SSD mixer and Doge's dynamic-mask attention, in Flax linen.

    h_0 = word_embed[ids];  cos, sin = RoPE(positions)   (dynamic NTK, head size P; shared by every layer)
    per layer i (attention iff i % attn_layer_period == attn_layer_offset, else SSD):
        h = post_sequence_residual * h + Mixer(RMSNorm(h))            Mixer = CheemsSSD (RoPE on B, C) or DMA
        h = post_state_residual * h + FFN(RMSNorm(h))                 FFN = MLP or product-key CDMoE (is_moe)
    logits = RMSNorm(h_L) @ word_embed^T  (tied) or lm_head

Params are a plain nested dict named like the upstream modules (`model/word_embed/embedding`,
`model/layers_{i}/ssd/c_proj/kernel`, `.../attn/q_proj/kernel`, `.../feed_forward/...`,
`model/final_layernorm/weight`), so conversion is flatten, rename, transpose (wmjax.convert.layout_cheems).
Decoding: `init_cache` gives attention layers a KV cache and SSD layers an f32 `SSMCache` [b, H, P, P]; a call with
s = 1 and the cache is one step (`ssd_step` for the SSD layers). Behaviour decisions: docs/CHEEMS.md.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from wmjax.cache import init_cache as _init_layer_caches
from wmjax.config import ConfigError
from wmjax.configs.cheems import KEEP_ALL, CheemsConfig
from wmjax.layers.attention import DynamicMaskAttention
from wmjax.layers.mlp import MLP
from wmjax.layers.norm import RMSNorm
from wmjax.layers.product_key_moe import ProductKeyCDMoE
from wmjax.layers.residual import Residual
from wmjax.layers.rope import rope_cos_sin
from wmjax.layers.ssd_mixer import CheemsSSD
from wmjax.models.causal_lm import (ACT_AXES, call_inputs, embedding, init_fn, layerwise_init, lm_head, lm_output,
                                    logical_axes, random_params, run_layers, stacked_layer_init, zero_pad_row)
from wmjax.models.registry import Family

__all__ = ["CheemsDecoderLayer", "CheemsModel", "CheemsForCausalLM", "init_params", "param_logical_axes",
           "init_cache", "describe", "FAMILY"]


class CheemsDecoderLayer(nn.Module):
    """One decoder layer of kind `layer_type` ("ssd" | "attention"); module names as upstream
    (pre_sequence_layernorm, ssd | attn, post_sequence_residual, pre_state_layernorm, feed_forward,
    post_state_residual)."""

    config: CheemsConfig
    layer_type: str = "ssd"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    ssd_impl: Optional[str] = None

    @nn.compact
    def __call__(self, h, rope_cos, rope_sin, positions, token_mask, segment_ids=None, layer_cache=None,
                 cache_length=None, deterministic=True):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype,
                                    name=name)
        u = norm("pre_sequence_layernorm")(h)
        if self.layer_type == "ssd":
            out, layer_cache = CheemsSSD(cfg, self.dtype, self.param_dtype, self.ssd_impl, name="ssd")(
                u, rope_cos, rope_sin, token_mask, segment_ids, layer_cache)
        else:
            out, layer_cache = DynamicMaskAttention(cfg.attention_config, self.dtype, self.param_dtype,
                                                    self.attention_impl, name="attn")(
                u, rope_cos, rope_sin, positions, token_mask, segment_ids, layer_cache, cache_length)
        out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
        h = Residual(cfg.hidden_size, self.dtype, self.param_dtype, name="post_sequence_residual")(h, out)
        h = nn.with_logical_constraint(h, ACT_AXES)

        m = norm("pre_state_layernorm")(h)
        if cfg.is_moe:
            ffn = ProductKeyCDMoE(cfg, self.dtype, self.param_dtype, name="feed_forward")(m)
        else:
            ffn = MLP(cfg, self.dtype, self.param_dtype, name="feed_forward")(m)
        ffn = nn.Dropout(cfg.hidden_dropout)(ffn, deterministic=deterministic)
        h = Residual(cfg.hidden_size, self.dtype, self.param_dtype, name="post_state_residual")(h, ffn)
        return nn.with_logical_constraint(h, ACT_AXES), layer_cache


class CheemsModel(nn.Module):
    """Embedding + decoder layers + final norm. Returns (hidden [b, s, d], cache)."""

    config: CheemsConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    ssd_impl: Optional[str] = None
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.word_embed = embedding(cfg, self.dtype, self.param_dtype)
        layer_cls = CheemsDecoderLayer
        if self.remat:
            layer_cls = nn.remat(CheemsDecoderLayer, static_argnums=(9,))  # (self, ...): deterministic
        self.layers = [layer_cls(cfg, kind, self.dtype, self.param_dtype, self.attention_impl, self.ssd_impl)
                       for kind in cfg.layer_types]
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions, token_mask, segment_ids=None, cache=None, deterministic=True):
        cfg = self.config
        h = nn.with_logical_constraint(self.word_embed(input_ids), ACT_AXES)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                                cfg.max_position_embeddings, dtype=self.dtype)
        h, cache, _ = run_layers(self.layers, h, cache, lambda layer, h, layer_cache, length: (*layer(
            h, cos, sin, positions, token_mask, segment_ids, layer_cache, length, deterministic), None))
        return self.final_layernorm(h), cache

    def attend(self, h):
        return self.word_embed.attend(h)


class CheemsForCausalLM(nn.Module):
    """`model.apply({"params": p}, input_ids [b, s], positions=None, cache=None, attention_mask=None,
    segment_ids=None) -> (logits [b, s, vocab] f32, cache)`.

    positions default to arange(s) (+ cache length when decoding); attention_mask [b, s] (1 = real token; a
    padding token neither reaches attention nor touches an SSD state); segment_ids [b, s] (packed documents:
    attention restricted to the document, SSD state reset at each document start; pass positions restarting at
    0 per document). `return_hidden=True` -> (hidden after the final norm [b, s, d], cache) for
    `wmjax.ops.cross_entropy.lm_head_cross_entropy` with :meth:`lm_head_weight`. `output_router_logits` is
    accepted and ignored: Cheems' CDMoE has no router loss.
    attention_impl: `wmjax.ops.dmattn` implementation; ssd_impl: `wmjax.ops.ssd.ssd` implementation
    (None = automatic: Pallas kernels on GPU).
    """

    config: CheemsConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None
    ssd_impl: Optional[str] = None

    def setup(self):
        self.model = CheemsModel(self.config, self.dtype, self.param_dtype, self.attention_impl, self.ssd_impl,
                                 self.remat)
        if not self.config.tie_word_embeddings:
            self.lm_head = lm_head(self.config, self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, segment_ids=None,
                 deterministic=True, output_router_logits=None, return_hidden=False):
        positions, token_mask = call_inputs(input_ids, positions, cache, attention_mask)
        h, cache = self.model(input_ids, positions, token_mask, segment_ids, cache, deterministic)
        return lm_output(self, h, cache, return_hidden)

    @staticmethod
    def lm_head_weight(config: CheemsConfig, params):
        """-> (weight, layout): the tied embedding [V, d] ("vd") or the lm_head kernel [d, V] ("dv")."""
        if config.tie_word_embeddings:
            return params["model"]["word_embed"]["embedding"], "vd"
        return params["lm_head"]["kernel"], "dv"


# ---------------------------------------------------------------------------------------------------- params
def _model_init_fn(config: CheemsConfig, param_dtype):
    return init_fn(CheemsForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype, attention_impl="reference",
                                     ssd_impl="chunked"))


def init_params(config: CheemsConfig, rng, param_dtype=jnp.float32):
    """Random params as upstream `_init_weights`: every Linear and the embedding N(0, initializer_range), biases 0,
    the pad row of word_embed 0; norms, residual scales and the raw SSD A at 1; SSD A_log (negative_exp) 0; CDMoE
    keys 0; except the attention's A = `config.attn_a_init` (0 by default, as Doge; upstream 1: with bf16
    compute it diverges, docs/CHEEMS.md, Training stability). A plain nested dict.

    Each layer kind is drawn by one layer init vmapped over per-layer keys (as doge.init_params), so the compiled
    init holds each random draw once per kind; embedding, final norm and untied head from the model's own init
    with one layer (discarded)."""
    kinds = config.layer_types
    layer_init = lambda kind, count: stacked_layer_init(
        CheemsDecoderLayer(config, kind, jnp.float32, param_dtype, "reference", "chunked"), count,
        config.hidden_size, config.head_dim)
    params = random_params(layerwise_init(_model_init_fn(config.replace(num_hidden_layers=1), param_dtype),
                                          layer_init, kinds, ("ssd", "attention")), rng)
    for i, kind in enumerate(kinds):  # attention A = config.attn_a_init (0 by default as Doge's; upstream 1)
        if kind == "attention" and config.attn_a_init != 0.0:
            a = params["model"][f"layers_{i}"]["attn"]["A"]
            params["model"][f"layers_{i}"]["attn"]["A"] = jnp.full_like(a, config.attn_a_init)
    return zero_pad_row(params, ("model", "word_embed", "embedding"), config.pad_token_id)


def param_logical_axes(config: CheemsConfig):
    """Same structure as the params; each leaf a tuple of logical axis names."""
    return logical_axes(_model_init_fn(config, jnp.float32))


# ---------------------------------------------------------------------------------------------------- cache
def init_cache(config: CheemsConfig, batch: int, max_length: int, dtype=jnp.float32, kind: str = "full",
               multiple_of: int = 1):
    """An empty decode cache: {"length", "layers"}; attention layers a KV cache (`wmjax.cache`, kind "full" or
    "bounded"), SSD layers an `SSMCache` with an f32 state [batch, H, P, P]. "bounded" needs a finite
    keep_window_size (Cheems keeps every key by default)."""
    if kind == "bounded" and config.keep_window_size >= KEEP_ALL:
        raise ConfigError("init_cache: kind='bounded' keeps keep_window_size keys per head, but this Cheems config "
                          "keeps every key (keep_window_size unset); use kind='full' or set keep_window_size")
    return _init_layer_caches(config, batch, max_length, dtype, kind, multiple_of)


def describe(config: CheemsConfig) -> str:
    kinds = config.layer_types
    n_attn = kinds.count("attention")
    return (f"Cheems, {config.num_hidden_layers} layers ({len(kinds) - n_attn} ssd, {n_attn} attention), "
            f"d={config.hidden_size}, heads={config.num_attention_heads}, vocab={config.vocab_size}"
            f"{', product-key CDMoE' if config.is_moe else ''}, ssd_a={config.ssd_a}")


FAMILY = Family(name="cheems", config_cls=CheemsConfig, model_cls=CheemsForCausalLM, init_params=init_params,
                param_logical_axes=param_logical_axes, init_cache=init_cache, describe=describe)
