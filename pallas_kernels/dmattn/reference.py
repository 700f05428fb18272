"""Dynamic Mask Attention (DMA) in plain jnp: the definition every other path is built on.

Semantics (`transformers` DogeAttention, `attn_implementation="eager"`; docs/DOGE.md, Dynamic mask attention):

    bias[b, g, j]   = exp(A_g * softplus(dt_proj(v_j))_g)          (computed by the layer, passed in as key_bias)
    allowed[i, j]   = key_mask[j] & key_pos[j] <= query_pos[i]     (causal + padding)
                      [& seg[i] == seg[j]] [& key_pos[j] > query_pos[i] - sliding_window]
    tau[i]          = the keep_window_size-th largest bias[j] over allowed j (-inf if fewer are allowed)
    kept[i, j]      = allowed[i, j] & bias[j] >= tau[i]             (ties at tau are all kept)
    out[i]          = softmax_j(scale q_i . k_j + (bias[j] if kept[i, j] else finfo(f32).min)) @ V

`keep_threshold` and `dynamic_mask_softmax` are the two steps; the O(L^2) reference below, the decode caches
(the library's) and the decode kernels' reference (`pallas_kernels.decode.reference`) call them. A row with no
allowed key gets the uniform average of the values (every score is finfo.min), as in HF.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["allowed_mask", "keep_threshold", "dynamic_mask_softmax", "dynamic_mask_attention_reference"]


def allowed_mask(query_positions, key_positions, key_mask=None, query_segment_ids=None, key_segment_ids=None,
                 sliding_window=None):
    """[b, Sq, Sk] bool: causal by position, real keys only (+ same document, + sliding window)."""
    qp = query_positions[:, :, None]
    kp = key_positions[:, None, :]
    allowed = kp <= qp
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :].astype(bool)
    if query_segment_ids is not None:
        allowed = allowed & (query_segment_ids[:, :, None] == key_segment_ids[:, None, :])
    if sliding_window is not None:
        allowed = allowed & (kp > qp - sliding_window)
    return allowed


def keep_threshold(key_bias, allowed, keep_window_size: int):
    """tau [..., q]: the keep_window_size-th largest key bias among each row's allowed keys (-inf if fewer).

    key_bias [..., k] f32 and allowed [..., q, k] bool, broadcast against each other as key_bias[..., None, :].
    """
    masked = jnp.where(allowed, key_bias[..., None, :], -jnp.inf)
    n, w = masked.shape[-1], int(keep_window_size)
    if w >= n:
        return jnp.full(masked.shape[:-1], -jnp.inf, masked.dtype)
    if w == n - 1:  # the second smallest (a decode step over w cached keys + 1): no sort
        lowest = jax.nn.one_hot(jnp.argmin(masked, axis=-1), n, dtype=bool)
        return jnp.min(jnp.where(lowest, jnp.inf, masked), axis=-1)
    return jax.lax.top_k(masked, w)[0][..., -1]


def dynamic_mask_softmax(scores, key_bias, allowed, keep_window_size: int):
    """softmax over k of scores + (key_bias if kept else finfo(f32).min), kept = allowed & key_bias >= tau.

    scores [..., q, k] f32; key_bias [..., k] f32 and allowed [..., q, k] bool broadcast against scores
    (key_bias[..., None, :]). Returns the probabilities [..., q, k] f32.
    """
    tau = keep_threshold(key_bias, allowed, keep_window_size)
    bias = key_bias[..., None, :]
    kept = allowed & (bias >= tau[..., None])
    return jax.nn.softmax(scores + jnp.where(kept, bias, jnp.finfo(jnp.float32).min), axis=-1)


def dynamic_mask_attention_reference(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    key_bias: jax.Array,
    *,
    keep_window_size: int,
    query_positions: jax.Array,
    key_positions: jax.Array,
    key_mask: Optional[jax.Array] = None,
    query_segment_ids: Optional[jax.Array] = None,
    key_segment_ids: Optional[jax.Array] = None,
    sliding_window: Optional[int] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """O(L^2) DMA. query [b, Sq, H, D]; key, value [b, Sk, G, D] (H % G == 0); key_bias [b, Hb, Sk] with Hb in
    {G (HF-native), H (legacy per-query-head)}; positions [b, Sq] / [b, Sk] int32; key_mask [b, Sk] (1 = real
    key); segment ids [b, Sq] / [b, Sk]. Returns [b, Sq, H, D] in query.dtype; scores and softmax in f32."""
    b, sq, h, d = query.shape
    g = key.shape[2]
    hb = key_bias.shape[1]
    if h % g or hb not in (g, h):
        raise ValueError(f"dynamic_mask_attention: heads={h}, kv heads={g}, bias heads={hb} are inconsistent")
    scale = d ** -0.5 if scale is None else scale
    r = h // g
    allowed = allowed_mask(query_positions, key_positions, key_mask, query_segment_ids, key_segment_ids,
                           sliding_window)
    bias = key_bias.astype(jnp.float32)
    bias = bias[:, :, None] if hb == g else bias.reshape(b, g, r, -1)              # [b, G, 1 | r, Sk]
    hp = jax.lax.Precision.HIGHEST
    q = query.astype(jnp.float32).reshape(b, sq, g, r, d).transpose(0, 2, 3, 1, 4)  # [b, G, r, Sq, D]
    k = key.astype(jnp.float32).transpose(0, 2, 1, 3)                              # [b, G, Sk, D]
    v = value.astype(jnp.float32).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bgrqd,bgkd->bgrqk", q, k, precision=hp) * scale
    probs = dynamic_mask_softmax(scores, bias, allowed[:, None, None], keep_window_size)
    out = jnp.einsum("bgrqk,bgkd->bgrqd", probs, v, precision=hp)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, h, d).astype(query.dtype)
