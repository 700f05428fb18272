"""Decode caches: one pytree for the whole model, static shapes, jit-friendly.

Layout (full KV cache, per attention layer):
    key, value      [batch, max_length, kv_heads, head_dim]   (RoPE already applied to keys)
    key_bias        [batch, bias_heads, max_length] f32       (exp(A * softplus(dt_proj(v))) per cached key)
    key_position    [batch, max_length] int32                 (position of the token in each slot)
    key_mask        [batch, max_length] bool                  (slot holds a real token)
Model level: {"length": int32 scalar (slots written so far), "layers": tuple of per-layer caches}.
Caching the per-key bias is exact: it depends only on that key's own value vector (doge.md s4.4).
State-space layers (Cheems/OTCE) will add their own per-layer entries (recurrent state, conv state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wmjax.config import DogeConfig


def init_kv_layer_cache(batch: int, max_length: int, kv_heads: int, head_dim: int, bias_heads: int, dtype):
    return {
        "key": jnp.zeros((batch, max_length, kv_heads, head_dim), dtype),
        "value": jnp.zeros((batch, max_length, kv_heads, head_dim), dtype),
        "key_bias": jnp.zeros((batch, bias_heads, max_length), jnp.float32),
        "key_position": jnp.zeros((batch, max_length), jnp.int32),
        "key_mask": jnp.zeros((batch, max_length), bool),
    }


def init_cache(config: DogeConfig, batch: int, max_length: int, dtype=jnp.float32):
    """An empty full KV cache for `config` holding up to `max_length` tokens per row."""
    if max_length <= 0:
        raise ValueError(f"init_cache: max_length={max_length} must be positive")
    layer = lambda: init_kv_layer_cache(batch, max_length, config.num_key_value_heads, config.head_dim,
                                        config.num_bias_heads, dtype)
    return {"length": jnp.zeros((), jnp.int32), "layers": tuple(layer() for _ in range(config.num_hidden_layers))}


def write_kv(layer_cache, key, value, key_bias, positions, token_mask, length):
    """Write s new tokens into slots [length, length + s). key/value [b, s, G, D], key_bias [b, Hb, s]."""
    upd = lambda buf, new, axis: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), length, axis)
    return {
        "key": upd(layer_cache["key"], key, 1),
        "value": upd(layer_cache["value"], value, 1),
        "key_bias": upd(layer_cache["key_bias"], key_bias, 2),
        "key_position": upd(layer_cache["key_position"], positions.astype(jnp.int32), 1),
        "key_mask": upd(layer_cache["key_mask"], token_mask.astype(bool), 1),
    }
