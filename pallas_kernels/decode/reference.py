"""The decode kernels' meaning in plain jnp: `decode_linear_reference`, `decode_layer_attention_reference`, and
the small helpers they share with the kernels and with the model (`wmjax.layers` imports RMSNorm's statistics
and RoPE from here, so the decode step and the model round alike).

    rms_norm(x; w) = w * (x / sqrt(mean(x^2) + eps))      statistics in f32, cast back to x.dtype, then * w
    rope(x)        = [x1 c - x2 s, x2 c + x1 s]           x = [x1, x2] halves of head_dim (HF rotate_half layout)

Each elementwise step is rounded to the compute dtype as the model's jnp code rounds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.dmattn.reference import dynamic_mask_softmax

__all__ = ["rms_normalize", "rms_norm", "apply_rope_pairs", "apply_rope", "rounded_silu_mul", "epilogue",
           "decode_linear_reference", "decode_layer_attention_reference"]

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def rms_normalize(x, eps: float):
    """x [..., dim] -> x / sqrt(mean(x^2) + eps), the statistics in f32, cast back to x.dtype."""
    x32 = x.astype(_F32)
    return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))).astype(x.dtype)


def rms_norm(x, weight, eps: float, dtype):
    """HF DogeRMSNorm's value: weight (cast to `dtype`) * rms_normalize(x)."""
    return weight.astype(dtype) * rms_normalize(x, eps)


def apply_rope_pairs(x, cos, sin):
    """x, cos, sin [..., 2, D/2] (the two halves of head_dim; cos/sin broadcastable) -> [..., 2, D/2]:

        [x1 * c1 + x2 * (-s1), x2 * c2 + x1 * s2]   (= x * cos + rotate_half(x) * sin on the flat layout)

    The pair swap is a view (`x[..., ::-1, :]`, an HLO reverse), not rotate_half's concatenate.
    """
    sign = jnp.array([[-1], [1]], dtype=sin.dtype)                     # [2, 1]
    return x * cos + x[..., ::-1, :] * (sin * sign)


def apply_rope(x, cos, sin):
    """x [b, s, heads, head_dim]; cos, sin [b, s, head_dim] (both halves equal) -> [b, s, heads, head_dim]."""
    d = x.shape[-1]
    pairs = lambda t: t.reshape(t.shape[:-1] + (2, d // 2))
    out = apply_rope_pairs(pairs(x), pairs(cos[:, :, None, :]), pairs(sin[:, :, None, :]))
    return out.reshape(x.shape)


def rounded_silu_mul(gate, up, dtype):
    """silu(gate) * up with the compute dtype's rounding after each op (jax.nn.silu then a multiply)."""
    sig = jax.nn.sigmoid(gate.astype(_F32)).astype(dtype)
    act = (gate.astype(_F32) * sig.astype(_F32)).astype(dtype)
    return (act.astype(_F32) * up.astype(_F32)).astype(dtype)


def epilogue(accs, dtype, bias, up_bias, residual, residual_scale):
    """A projection's f32 accumulator(s) -> the compute dtype, + bias, SwiGLU (accs = (gate, up)), residual:
        y = round(acc) + bias;  y = silu(y) * (round(acc_up) + up_bias);  y = round(scale * residual) + y.
    bias, up_bias, residual, residual_scale: None or a function returning the value (the kernel loads each where
    it is first needed); bias, up_bias and residual_scale in the compute dtype, broadcast against the accumulator."""
    y = accs[0].astype(dtype)
    if bias is not None:
        y = y + bias()
    if len(accs) > 1:
        up = accs[1].astype(dtype)
        if up_bias is not None:
            up = up + up_bias()
        y = rounded_silu_mul(y, up, dtype)
    if residual is not None:
        scaled = (residual_scale().astype(_F32) * residual().astype(_F32)).astype(dtype)
        y = (scaled.astype(_F32) + y.astype(_F32)).astype(dtype)
    return y


def decode_linear_reference(x, weight, *, up_weight=None, norm_weight=None, eps: float = 1e-6, bias=None,
                            up_bias=None, residual=None, residual_scale=None, out_dtype=None):
    """`decode_linear`'s meaning (same arguments; any rows): x [rows, K] -> [rows, N] in out_dtype (default: the
    weight's dtype = the compute dtype): optional RMSNorm prologue, x W^T with f32 accumulation, `epilogue`."""
    dtype = weight.dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    prec = lax.Precision.HIGHEST if dtype == _F32 else None
    xn = (x if norm_weight is None else rms_norm(x, norm_weight, eps, dtype)).astype(dtype)
    product = lambda w: lax.dot_general(xn, w, _NT, precision=prec, preferred_element_type=_F32)
    accs = (product(weight),) if up_weight is None else (product(weight), product(up_weight))
    value = lambda v: None if v is None else (lambda: v.astype(dtype))
    y = epilogue(accs, dtype, value(bias), value(up_bias), None if residual is None else (lambda: residual),
                 value(residual_scale))
    return y.astype(out_dtype)


def decode_layer_attention_reference(qkv, cos, sin, valid, slot, q_norm, k_norm, dt_weight, dt_bias, A,
                                     key_cache, value_cache, bias_cache, *, num_heads: int, eps: float,
                                     scale: float, qk_norm=True):
    """`decode_layer_attention`'s meaning (same arguments; rows >= batch of att are zeros): the new token's q/k
    RMSNorm and RoPE, its key bias exp(A softplus(v . W_dt + b_dt)), the cache write at `slot`, and the dynamic-mask
    softmax over the visible slots (`dynamic_mask_softmax`; the cache is no longer than keep_window_size, so every
    visible key is kept)."""
    b, g, c, d = key_cache.shape
    rows = qkv.shape[0]
    h, dtype, cdt = num_heads, cos.dtype, key_cache.dtype
    x = qkv[:b]
    q = x[:, :h * d].reshape(b, 1, h, d).astype(dtype)
    k = x[:, h * d:(h + g) * d].reshape(b, 1, g, d).astype(dtype)
    v = x[:, (h + g) * d:].astype(dtype)                                          # [b, G D]
    if qk_norm:
        q, k = rms_norm(q, q_norm, eps, dtype), rms_norm(k, k_norm, eps, dtype)
    q = apply_rope(q, cos[:, None], sin[:, None])[:, 0]                            # [b, H, D]
    k = apply_rope(k, cos[:, None], sin[:, None])[:, 0].astype(cdt)               # [b, G, D]
    # dt in f32 (the model's dt_proj runs in f32 for any compute dtype): v rounded to dtype, W_dt and b_dt as given
    dt = lax.dot_general(v.astype(_F32), dt_weight.astype(_F32), _NT, precision=lax.Precision.HIGHEST,
                         preferred_element_type=_F32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(_F32)
    bias_new = jnp.exp(A.astype(_F32) * jax.nn.softplus(dt))                       # [b, G]
    v_new = v.reshape(b, g, d).astype(cdt)
    s0 = jnp.reshape(jnp.asarray(slot, jnp.int32), ())
    zero = jnp.zeros((), jnp.int32)
    key_cache = lax.dynamic_update_slice(key_cache, k[:, :, None], (zero, zero, s0, zero))
    value_cache = lax.dynamic_update_slice(value_cache, v_new[:, :, None], (zero, zero, s0, zero))
    bias_cache = lax.dynamic_update_slice(bias_cache, bias_new[:, :, None], (zero, zero, s0))
    visible = (valid != 0).at[:, s0].set(True)                                     # the new token is visible
    qg = q.reshape(b, g, h // g, 1, d)
    hp = lax.Precision.HIGHEST
    s = jnp.einsum("bgrqd,bgcd->bgrqc", qg, key_cache.astype(dtype), precision=hp, preferred_element_type=_F32)
    p = dynamic_mask_softmax(s * scale, bias_cache[:, :, None], visible[:, None, None, None, :], c)
    out = jnp.einsum("bgrqc,bgcd->bgrqd", p, value_cache.astype(dtype).astype(_F32), precision=hp)
    att = out.reshape(b, h * d).astype(dtype)
    return jnp.pad(att, ((0, rows - b), (0, 0))), key_cache, value_cache, bias_cache
