"""Decode kernels (Pallas, Triton backend): a projection with the layer's RMSNorm / bias / SwiGLU / residual
fused in (`linear`), one Doge layer's attention from the fused q/k/v projection to its output with the cache
written in place (`attention`), their plain-jnp meaning (`reference`) and tuned defaults (`tuning`)."""

from pallas_kernels.decode.attention import decode_layer_attention
from pallas_kernels.decode.linear import decode_linear
from pallas_kernels.decode.reference import decode_layer_attention_reference, decode_linear_reference

__all__ = ["decode_layer_attention", "decode_layer_attention_reference", "decode_linear", "decode_linear_reference"]
