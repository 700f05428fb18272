"""The pieces the families' causal-LM modules share (Doge, Cheems, OTCE; Om where its model is alike): the token
embedding and the untied LM head with their initialisers, the call's input defaults, the decoder-layer loop over a
decode cache, the logits' dtype and sharding, and the random-init / logical-axes helpers of the params.

A submodule built here is named by the attribute its caller assigns it to (in `setup`), so the param trees, and
with them the conversion layouts, are the callers' own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.random_init import fast_random_compile

__all__ = ["ACT_AXES", "embedding", "lm_head", "call_inputs", "run_layers", "lm_output", "init_fn",
           "stacked_layer_init", "layerwise_init", "random_params", "zero_pad_row", "logical_axes"]

ACT_AXES = ("activation_batch", "activation_length", "activation_embed")
_LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


# ------------------------------------------------------------------------------------------------ modules
def embedding(config, dtype, param_dtype, num_embeddings: Optional[int] = None) -> nn.Embed:
    """nn.Embed [num_embeddings (None: config.vocab_size), hidden_size], N(0, initializer_range), logical axes
    ("vocab", "embed")."""
    init = nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), ("vocab", "embed"))
    return nn.Embed(config.vocab_size if num_embeddings is None else num_embeddings, config.hidden_size,
                    dtype=dtype, param_dtype=param_dtype, embedding_init=init)


def lm_head(config, dtype, param_dtype) -> nn.Dense:
    """The untied LM head: bias-free nn.Dense(vocab_size), kernel [hidden, vocab] N(0, initializer_range), logical
    axes ("embed", "vocab")."""
    return nn.Dense(config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range),
                                                             ("embed", "vocab")))


# ------------------------------------------------------------------------------------------------ the call
def call_inputs(input_ids, positions, cache, attention_mask):
    """input_ids [b, s] (else ValueError) -> (positions [b, s] int32, token_mask [b, s] bool): positions default to
    arange(s) (+ cache["length"] with a cache); token_mask is attention_mask != 0 (all True when None)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, s = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if cache is not None:
            positions = positions + cache["length"]
    token_mask = jnp.ones((b, s), bool) if attention_mask is None else attention_mask.astype(bool)
    return positions.astype(jnp.int32), token_mask


def run_layers(layers: Sequence[Any], h, cache, call: Callable):
    """h [b, s, d] through `layers` in order, each as call(layer, h, layer_cache, cache_length) -> (h, layer_cache,
    stats or None); cache None or {"length", "layers"}. -> (h, the new cache (length + s) or None, [the stats that
    are not None])."""
    length = None if cache is None else cache["length"]
    new_layers, stats = [], []
    for i, layer in enumerate(layers):
        h, layer_cache, layer_stats = call(layer, h, None if cache is None else cache["layers"][i], length)
        new_layers.append(layer_cache)
        if layer_stats is not None:
            stats.append(layer_stats)
    new_cache = None
    if cache is not None:
        new_cache = {"length": cache["length"] + h.shape[1], "layers": tuple(new_layers)}
    return h, new_cache, stats


def lm_output(lm: nn.Module, h, cache, return_hidden: bool):
    """The end of a ForCausalLM's call (lm: the bound module; its `model.attend` is the tied head, its `lm_head` the
    untied one): (h, cache) when return_hidden (not at init, so the head's params exist), else (logits [b, s, V]
    f32, cache)."""
    if return_hidden and not lm.is_initializing():
        return h, cache
    logits = lm.model.attend(h) if lm.config.tie_word_embeddings else lm.lm_head(h)
    return nn.with_logical_constraint(logits.astype(jnp.float32), _LOGITS_AXES), cache


# ------------------------------------------------------------------------------------------------ params
def init_fn(model: nn.Module, seq_len: int = 2):
    """rng -> the model's (boxed) params, from `model.init` on zero tokens [1, seq_len]."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return lambda rng: model.init(rng, tokens)["params"]


def stacked_layer_init(layer: nn.Module, count: int, hidden_size: int, rope_dim: int):
    """rng -> `count` params of a decoder layer called as layer(h, cos, sin, positions, token_mask), stacked on a
    leading axis: one layer init `vmap`ped over per-layer keys (the compiled init holds each random draw once)."""
    h = jnp.zeros((1, 2, hidden_size), jnp.float32)
    rope = jnp.zeros((1, 2, rope_dim), jnp.float32)
    positions, mask = jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)

    def init(rng):
        keys = jax.random.split(rng, count)
        return jax.vmap(lambda k: nn.meta.unbox(layer.init(k, h, rope, rope, positions, mask)["params"]))(keys)

    return init


def layerwise_init(model_init: Callable, layer_init: Callable, layer_kinds: Sequence[str],
                   kind_order: Sequence[str]):
    """rng -> params whose decoder layers `model/layers_{i}` are drawn per kind by layer_init(kind, count) (rng ->
    `count` stacked layers), the rest (embedding, final norm, head) by model_init (rng -> the params of the model
    with one layer, that layer discarded). layer_kinds: the kind of each layer; the rng splits into the model's
    key and one key per entry of kind_order (a kind without layers draws nothing)."""

    def init(rng):
        rng_model, *rng_kinds = jax.random.split(rng, 1 + len(kind_order))
        params = nn.meta.unbox(model_init(rng_model))
        model = {k: v for k, v in params["model"].items() if not k.startswith("layers_")}
        for kind, key in zip(kind_order, rng_kinds):
            idx = [i for i, t in enumerate(layer_kinds) if t == kind]
            if not idx:
                continue
            stacked = layer_init(kind, len(idx))(key)
            for j, i in enumerate(idx):
                model[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, j=j: x[j], stacked)
        return dict(params, model=model)

    return init


def random_params(init: Callable, rng):
    """init(rng), jitted with the one-kernel threefry (XLA:GPU compiled the unrolled one for > 45 s, > 100 s for
    OTCE-160M) and unboxed: a plain nested dict."""
    with fast_random_compile():
        return nn.meta.unbox(jax.jit(init)(rng))


def zero_pad_row(params, path: Sequence[str], pad_token_id: Optional[int]):
    """params with row pad_token_id of the embedding table at `path` set to 0 (in place; none when pad_token_id is
    None)."""
    if pad_token_id is not None:
        node = params
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]].at[pad_token_id].set(0)
    return params


def logical_axes(init: Callable):
    """The params' logical axis names, from a boxed init (rng -> params): the same tree, each leaf a tuple of names
    (e.g. ("embed", "mlp"))."""
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return jax.tree_util.tree_map(lambda p: tuple(p), specs,
                                  is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
