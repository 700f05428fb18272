"""Rotary position embedding (Su et al. 2021), NeoX "rotate_half" layout, as HF Doge.

    inv_freq_i = theta^(-2i/D),  emb = concat(pos * inv_freq, pos * inv_freq),
    x' = x * cos(emb) + rotate_half(x) * sin(emb),   rotate_half([x1, x2]) = [-x2, x1].

RoPE types: "default"; "linear" (positions / factor); "dynamic" (NTK-aware, HF `dynamic`): when the largest
position of the call + 1 = Lp exceeds max_position_embeddings M, theta becomes
theta * (factor * Lp / M - (factor - 1)) ** (D / (D - 2)). HF keeps the largest Lp seen so far in module state;
wmjax is functional and uses the current call's Lp (identical for a single forward; documented in docs/DOGE.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, theta, rope_type: str = "default", factor: float = 1.0,
                  max_position_embeddings: int = 2048, positions=None):
    """[head_dim // 2] f32 inverse frequencies (positions are needed only for "dynamic")."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    base = jnp.asarray(theta, jnp.float32)
    if rope_type == "dynamic":
        seq_len = jnp.max(positions).astype(jnp.float32) + 1.0
        seq_len = jnp.maximum(seq_len, float(max_position_embeddings))
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1.0)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** exponent)


def rope_cos_sin(positions, head_dim: int, theta, rope_type="default", factor=1.0, max_position_embeddings=2048,
                 dtype=jnp.float32):
    """positions [b, s] int -> (cos, sin) each [b, s, head_dim], computed in f32 then cast to `dtype`."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_type, factor, max_position_embeddings, positions)
    pos = positions.astype(jnp.float32)
    if rope_type == "linear":
        pos = pos / factor
    freqs = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """x [b, s, heads, head_dim]; cos, sin [b, s, head_dim]."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
