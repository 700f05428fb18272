"""Decode kernels (Pallas, Triton backend): single-token attention over a layer-stacked KV cache."""

from pallas_kernels.decode.attention import decode_attention_pallas, decode_attention_reference

__all__ = ["decode_attention_pallas", "decode_attention_reference"]
