"""Decode kernels (Pallas, Triton backend), each beside its plain-jnp reference: a projection with the layer's
RMSNorm / bias / SwiGLU / residual fused in (`linear.py`), and one Doge layer's attention from the fused q/k/v
projection to its output, with the cache written in place (`attention.py`)."""

from pallas_kernels.decode.attention import decode_layer_attention, decode_layer_attention_reference
from pallas_kernels.decode.linear import combine_partials, decode_linear, decode_linear_reference

__all__ = ["combine_partials", "decode_layer_attention", "decode_layer_attention_reference", "decode_linear",
           "decode_linear_reference"]
