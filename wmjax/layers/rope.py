"""Rotary position embedding (Su et al. 2021), NeoX "rotate_half" layout, as HF Doge.

    inv_freq_i = theta^(-2i/D),  emb = concat(pos * inv_freq, pos * inv_freq),
    x' = x * cos(emb) + rotate_half(x) * sin(emb),   rotate_half([x1, x2]) = [-x2, x1].

Computed per half (x = [x1, x2], c/s = cos/sin of the D/2 frequencies):

    x1' = x1 * c + x2 * (-s),    x2' = x2 * c + x1 * s

as one elementwise expression over the view x [..., 2, D/2] and its pair-swapped view x[..., ::-1, :] (an HLO
`reverse`, not the split + `concatenate` of `rotate_half`), so XLA fuses RoPE into its producer (the q/k norm) and
its transpose (again a `reverse`) into the backward pass without a separate concatenate kernel in either
direction. Same products and sums per element as the rotate_half formula ((-x2) * s == x2 * (-s) exactly).
`apply_rope` / `apply_rope_pairs` are defined beside the decode kernels (`pallas_kernels.decode.reference`), which
apply the same rotation, and imported here.

RoPE types: "default"; "linear" (positions / factor); "dynamic" (NTK-aware, HF `dynamic`): when the largest
position of the call + 1 = Lp exceeds max_position_embeddings M, theta becomes
theta * (factor * Lp / M - (factor - 1)) ** (D / (D - 2)). HF keeps the largest Lp seen so far in module state;
wmjax is functional and uses the current call's Lp (identical for a single forward; documented in docs/DOGE.md).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.decode.reference import apply_rope, apply_rope_pairs

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "apply_rope_pairs"]


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
    """positions [b, s] int -> (cos, sin) each [b, s, head_dim] (both halves equal), computed in f32 then cast to
    `dtype`."""
    inv_freq = rope_inv_freq(head_dim, theta, rope_type, factor, max_position_embeddings, positions)
    pos = positions.astype(jnp.float32)
    if rope_type == "linear":
        pos = pos / factor
    freqs = pos[..., None] * inv_freq                                   # [b, s, D/2]
    emb = jnp.broadcast_to(freqs[..., None, :], freqs.shape[:-1] + (2, head_dim // 2)).reshape(
        freqs.shape[:-1] + (head_dim,))                                 # [b, s, D] = [freqs, freqs]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
