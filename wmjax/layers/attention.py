"""Dynamic Mask Attention layer (Doge; "Wonderful Matrices", arXiv 2412.11834).

    q = RMSNorm_q(x W_q), k = RMSNorm_k(x W_k), v = x W_v          [b, s, heads, head_dim] (q/k norm over head_dim)
    q, k = RoPE(q), RoPE(k)
    bias_j = exp(A * softplus(v_j W_dt))                           [b, bias_heads, s]  (one value per key and head;
                                                                    v_j W_dt in f32 for any compute dtype)
    out = DMA(q, k, v, bias) W_o                                   (op: wmjax.ops.dmattn)

Params (named like HF `DogeAttention`): q_proj, k_proj, v_proj, o_proj, dt_proj (Dense), A [bias_heads],
q_norm, k_norm (RMSNorm [head_dim], absent in the legacy `qk_norm=False` layout).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from wmjax.cache import BoundedKVCache, bounded_kv_attention, kv_decode_attention, write_kv
from wmjax.config import DogeConfig
from wmjax.layers.linear import dense, qkv_dense
from wmjax.layers.norm import RMSNorm
from wmjax.layers.rope import apply_rope
from wmjax.ops.dmattn import dynamic_mask_attention


class DynamicMaskAttention(nn.Module):
    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None  # None (auto) | "reference" | "pallas"

    @nn.compact
    def __call__(self, x, rope_cos, rope_sin, positions, token_mask, segment_ids=None, layer_cache=None,
                 cache_length=None):
        """x [b, s, hidden]; rope_cos/sin [b, s, head_dim]; positions [b, s] int32; token_mask [b, s] bool.

        Returns (out [b, s, hidden], new layer_cache or None).
        """
        cfg = self.config
        b, s, _ = x.shape
        h, g, d, hb = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_bias_heads
        mk = lambda n, axes, name: dense(n, axes, use_bias=cfg.attention_bias, init_std=cfg.initializer_range,
                                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        # q, k, v: one gemm over [W_q | W_k | W_v] (params still q_proj/k_proj/v_proj; wmjax.layers.linear)
        q, k, v = qkv_dense(x, h, g, d, use_bias=cfg.attention_bias, init_std=cfg.initializer_range,
                            dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.qk_norm:
            q = RMSNorm(d, cfg.rms_norm_eps, ("head_dim",), self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(d, cfg.rms_norm_eps, ("head_dim",), self.dtype, self.param_dtype, name="k_norm")(k)
        q = apply_rope(q, rope_cos, rope_sin)
        k = apply_rope(k, rope_cos, rope_sin)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", None))

        # dynamic mask bias: one value per key (and bias head), from the key's own value vector
        # dt in f32 (exact products, HIGHEST: no TF32) whatever the compute dtype: rounded to bf16, large biases
        # tie exactly and the dt gradient is ~100x wrong, which diverges training (docs/CHEEMS.md, stability)
        dt = dense(hb, ("kv_heads", "bias_heads"), use_bias=cfg.attention_bias, init_std=cfg.initializer_range,
                   dtype=jnp.float32, param_dtype=self.param_dtype, precision=lax.Precision.HIGHEST,
                   name="dt_proj")(v.reshape(b, s, g * d))
        A = self.param("A", nn.with_logical_partitioning(nn.initializers.zeros, ("bias_heads",)), (hb,),
                       self.param_dtype)
        key_bias = jnp.exp(A.astype(jnp.float32) * jax.nn.softplus(dt.astype(jnp.float32)))  # [b, s, hb]
        key_bias = key_bias.transpose(0, 2, 1)  # [b, hb, s]

        if isinstance(layer_cache, BoundedKVCache):
            # bounded dynamic-mask cache (wmjax.cache): w slots per bias head + the new tokens as candidates
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
            out, layer_cache = bounded_kv_attention(layer_cache, q, k, v, key_bias, positions, token_mask,
                                                    keep_window_size=cfg.keep_window_size, scale=d ** -0.5)
            out = out.reshape(b, s, h * d)
            return mk(cfg.hidden_size, ("q_heads", "embed"), "o_proj")(out), layer_cache
        if layer_cache is not None:
            layer_cache = write_kv(layer_cache, k, v, key_bias, positions, token_mask, cache_length)
            if s == 1 and segment_ids is None:
                # single-token decode: same semantics as the op, without its [Sq, Sk] machinery
                out = kv_decode_attention(layer_cache, q, positions, keep_window_size=cfg.keep_window_size,
                                          scale=d ** -0.5, sliding_window=cfg.sliding_window)
                out = out.reshape(b, s, h * d)
                return mk(cfg.hidden_size, ("q_heads", "embed"), "o_proj")(out), layer_cache
            # several tokens (prefill): the op reads keys / values [b, C, G, D]; the cache holds [b, G, C, D]
            keys, values = layer_cache["key"].transpose(0, 2, 1, 3), layer_cache["value"].transpose(0, 2, 1, 3)
            kbias = layer_cache["key_bias"]
            kpos, kmask = layer_cache["key_position"], layer_cache["key_mask"]
            qseg = kseg = None
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported together with a decode cache")
        else:
            keys, values, kbias, kpos, kmask = k, v, key_bias, positions, token_mask
            qseg = kseg = segment_ids
        out = dynamic_mask_attention(
            q, keys.astype(q.dtype), values.astype(q.dtype), kbias,
            keep_window_size=cfg.keep_window_size, query_positions=positions, key_positions=kpos,
            key_mask=kmask, query_segment_ids=qseg, key_segment_ids=kseg, sliding_window=cfg.sliding_window,
            scale=d ** -0.5, implementation=self.attention_impl)
        out = out.reshape(b, s, h * d)
        out = mk(cfg.hidden_size, ("q_heads", "embed"), "o_proj")(out)
        return out, layer_cache
