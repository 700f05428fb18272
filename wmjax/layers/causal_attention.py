"""Plain causal grouped-query attention with RoPE (no dynamic mask): OTCE's `CheemsAttention` (SDPA semantics;
/work/shared/research/ssd_cheems_otce.md §2.5; docs/OTCE.md).

    q = x W_q, k = x W_k, v = x W_v          [b, s, H | G, P]
    q, k = RoPE(q), RoPE(k)                  (if rope)
    q *= max(1, ln(65 + position) / ln(4096))   (if logn: upstream's FlashAttention-2 path; off by default)
    out = softmax(q k^T / sqrt(P) + causal/padding/document mask) v W_o

Runs on the Dynamic Mask Attention op (`wmjax.ops.dmattn`) with a zero key bias and a keep window as long as the
keys, which is exactly this softmax (every allowed key kept, bias 0; on GPU the flash kernel's no-prepass path),
and decodes over the library's KV cache (`wmjax.cache.write_kv`, `kv_decode_attention`), whose per-key bias rows
stay zero. Params q_proj, k_proj, v_proj, o_proj (Dense, optional bias).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from wmjax.cache import kv_decode_attention, write_kv
from wmjax.layers.linear import dense, qkv_dense
from wmjax.layers.logn import logn_scale
from wmjax.layers.rope import apply_rope
from wmjax.ops.dmattn import dynamic_mask_attention

__all__ = ["CausalAttention"]


class CausalAttention(nn.Module):
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    init_std: float = 0.02
    rope: bool = True
    logn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None  # None (auto) | "reference" | "pallas" (wmjax.ops.dmattn)

    @nn.compact
    def __call__(self, x, rope_cos, rope_sin, positions, token_mask, segment_ids=None, layer_cache=None,
                 cache_length=None):
        """x [b, s, hidden]; rope_cos/sin [b, s, head_dim]; positions [b, s] int32; token_mask [b, s] bool;
        segment_ids [b, s] or None (not with a cache); layer_cache a `wmjax.cache.KVCache` or None, cache_length
        the slots already written. Returns (out [b, s, hidden], new layer_cache or None)."""
        b, s, _ = x.shape
        h, g, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv_dense(x, h, g, d, use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        if self.rope:
            q = apply_rope(q, rope_cos, rope_sin)
            k = apply_rope(k, rope_cos, rope_sin)
        if self.logn:
            q = (q.astype(jnp.float32) * logn_scale(positions)[..., None, None]).astype(q.dtype)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        o_proj = dense(self.hidden_size, ("q_heads", "embed"), use_bias=self.use_bias, init_std=self.init_std,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="o_proj")
        zero_bias = jnp.zeros((b, g, s), jnp.float32)

        if layer_cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
            layer_cache = write_kv(layer_cache, k, v, zero_bias, positions, token_mask, cache_length)
            slots = layer_cache["key"].shape[2]
            if s == 1:
                out = kv_decode_attention(layer_cache, q, positions, keep_window_size=slots, scale=d ** -0.5)
                return o_proj(out.reshape(b, s, h * d)), layer_cache
            keys = layer_cache["key"].transpose(0, 2, 1, 3).astype(q.dtype)
            values = layer_cache["value"].transpose(0, 2, 1, 3).astype(q.dtype)
            out = dynamic_mask_attention(
                q, keys, values, layer_cache["key_bias"], keep_window_size=slots, query_positions=positions,
                key_positions=layer_cache["key_position"], key_mask=layer_cache["key_mask"], scale=d ** -0.5,
                implementation=self.attention_impl)
        else:
            out = dynamic_mask_attention(
                q, k, v, zero_bias, keep_window_size=s, query_positions=positions, key_positions=positions,
                key_mask=token_mask, query_segment_ids=segment_ids, key_segment_ids=segment_ids, scale=d ** -0.5,
                implementation=self.attention_impl)
        return o_proj(out.reshape(b, s, h * d)), layer_cache
