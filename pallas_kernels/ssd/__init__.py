"""Mamba-2 SSD chunked scan: the plain-jnp definition (`reference`), the Pallas GPU kernels (Triton backend,
`kernels`), the custom-VJP op (`ops.ssd_pallas`) and its tuned defaults (`tuning`). Model code calls the
dispatcher `wmjax.ops.ssd.ssd`.
"""

from pallas_kernels.ssd.ops import ssd_pallas
from pallas_kernels.ssd.reference import segment_reset_counts, ssd_chunked, ssd_naive, ssd_step

__all__ = ["ssd_pallas", "ssd_naive", "ssd_chunked", "ssd_step", "segment_reset_counts"]
