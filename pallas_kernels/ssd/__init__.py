"""Pallas GPU (Triton backend) kernels for the Mamba-2 SSD chunked scan, forward and backward.

``ssd_pallas(x, dt, A, B, C, *, chunk_size, D, z, initial_state, segment_ids, interpret)`` -> (y, final_state);
use ``wmjax.ops.ssd.ssd`` (the dispatcher) in model code.
"""

from pallas_kernels.ssd.ops import ssd_pallas

__all__ = ["ssd_pallas"]
