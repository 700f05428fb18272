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
import jax
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
from wmjax.models.registry import Family
from wmjax.random_init import fast_random_compile

__all__ = ["CheemsDecoderLayer", "CheemsModel", "CheemsForCausalLM", "init_params", "param_logical_axes",
           "init_cache", "describe", "FAMILY"]

_ACT = ("activation_batch", "activation_length", "activation_embed")


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
        h = nn.with_logical_constraint(h, _ACT)

        m = norm("pre_state_layernorm")(h)
        if cfg.is_moe:
            ffn = ProductKeyCDMoE(cfg, self.dtype, self.param_dtype, name="feed_forward")(m)
        else:
            ffn = MLP(cfg, self.dtype, self.param_dtype, name="feed_forward")(m)
        ffn = nn.Dropout(cfg.hidden_dropout)(ffn, deterministic=deterministic)
        h = Residual(cfg.hidden_size, self.dtype, self.param_dtype, name="post_state_residual")(h, ffn)
        return nn.with_logical_constraint(h, _ACT), layer_cache


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
        self.word_embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                        ("vocab", "embed")))
        layer_cls = CheemsDecoderLayer
        if self.remat:
            layer_cls = nn.remat(CheemsDecoderLayer, static_argnums=(9,))  # (self, ...): deterministic
        self.layers = [layer_cls(cfg, kind, self.dtype, self.param_dtype, self.attention_impl, self.ssd_impl)
                       for kind in cfg.layer_types]
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), self.dtype, self.param_dtype)

    def __call__(self, input_ids, positions, token_mask, segment_ids=None, cache=None, deterministic=True):
        cfg = self.config
        h = nn.with_logical_constraint(self.word_embed(input_ids), _ACT)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_factor,
                                cfg.max_position_embeddings, dtype=self.dtype)
        length = None if cache is None else cache["length"]
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            h, layer_cache = layer(h, cos, sin, positions, token_mask, segment_ids, layer_cache, length,
                                   deterministic)
            new_layers.append(layer_cache)
        h = self.final_layernorm(h)
        new_cache = None
        if cache is not None:
            new_cache = {"length": cache["length"] + input_ids.shape[1], "layers": tuple(new_layers)}
        return h, new_cache

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
            self.lm_head = nn.Dense(
                self.config.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.config.initializer_range),
                                                         ("embed", "vocab")))

    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None, segment_ids=None,
                 deterministic=True, output_router_logits=None, return_hidden=False):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if cache is not None:
                positions = positions + cache["length"]
        token_mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
        h, cache = self.model(input_ids, positions.astype(jnp.int32), token_mask, segment_ids, cache, deterministic)
        if return_hidden and not self.is_initializing():
            return h, cache
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32),
                                            ("activation_batch", "activation_length", "activation_vocab"))
        return logits, cache

    @staticmethod
    def lm_head_weight(config: CheemsConfig, params):
        """-> (weight, layout): the tied embedding [V, d] ("vd") or the lm_head kernel [d, V] ("dv")."""
        if config.tie_word_embeddings:
            return params["model"]["word_embed"]["embedding"], "vd"
        return params["lm_head"]["kernel"], "dv"


# ---------------------------------------------------------------------------------------------------- params
def _model_init_fn(config: CheemsConfig, param_dtype):
    model = CheemsForCausalLM(config, dtype=jnp.float32, param_dtype=param_dtype, attention_impl="reference",
                              ssd_impl="chunked")
    tokens = jnp.zeros((1, 2), jnp.int32)
    return lambda rng: model.init(rng, tokens)["params"]


def _layer_init_fn(config: CheemsConfig, kind: str, count: int, param_dtype):
    """rng -> `count` layers of kind `kind`, stacked on a leading axis (one layer's init vmapped over keys)."""
    layer = CheemsDecoderLayer(config, kind, jnp.float32, param_dtype, "reference", "chunked")
    h = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
    rope = jnp.zeros((1, 2, config.head_dim), jnp.float32)
    positions, mask = jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)

    def init(rng):
        keys = jax.random.split(rng, count)
        return jax.vmap(lambda k: nn.meta.unbox(layer.init(k, h, rope, rope, positions, mask)["params"]))(keys)

    return init


def init_params(config: CheemsConfig, rng, param_dtype=jnp.float32):
    """Random params as upstream `_init_weights`: every Linear and the embedding N(0, initializer_range), biases 0,
    the pad row of word_embed 0; norms, residual scales and the raw SSD A at 1; SSD A_log (negative_exp) 0; CDMoE
    keys 0; except the attention's A = `config.attn_a_init` (0 by default, as Doge; upstream 1: with bf16
    compute it diverges, docs/CHEEMS.md, Training stability). A plain nested dict.

    Each layer kind is drawn by one layer init vmapped over per-layer keys (as doge.init_params), so the compiled
    init holds each random draw once per kind; embedding, final norm and untied head from the model's own init
    with one layer (discarded)."""
    kinds = config.layer_types

    def init(rng):
        rng_model, rng_ssd, rng_attn = jax.random.split(rng, 3)
        params = nn.meta.unbox(_model_init_fn(config.replace(num_hidden_layers=1), param_dtype)(rng_model))
        model = {k: v for k, v in params["model"].items() if not k.startswith("layers_")}
        for kind, key in (("ssd", rng_ssd), ("attention", rng_attn)):
            idx = [i for i, t in enumerate(kinds) if t == kind]
            if not idx:
                continue
            stacked = _layer_init_fn(config, kind, len(idx), param_dtype)(key)
            for j, i in enumerate(idx):
                model[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, j=j: x[j], stacked)
        return dict(params, model=model)

    with fast_random_compile():
        params = jax.jit(init)(rng)
    for i, kind in enumerate(kinds):  # attention A = config.attn_a_init (0 by default as Doge's; upstream 1)
        if kind == "attention" and config.attn_a_init != 0.0:
            a = params["model"][f"layers_{i}"]["attn"]["A"]
            params["model"][f"layers_{i}"]["attn"]["A"] = jnp.full_like(a, config.attn_a_init)
    if config.pad_token_id is not None:
        emb = params["model"]["word_embed"]["embedding"]
        params["model"]["word_embed"]["embedding"] = emb.at[config.pad_token_id].set(0)
    return params


def param_logical_axes(config: CheemsConfig):
    """Same structure as the params; each leaf a tuple of logical axis names."""
    boxed = jax.eval_shape(_model_init_fn(config, jnp.float32), jax.random.PRNGKey(0))
    specs = nn.get_partition_spec(boxed)
    return jax.tree_util.tree_map(lambda p: tuple(p), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


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
