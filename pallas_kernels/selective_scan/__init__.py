"""Mamba-1 selective scan (OTCE's SSM mixer): the plain-jnp definition and decode step (`reference`), the Pallas
GPU kernels (Triton backend, `kernels`), the custom-VJP op (`ops.selective_scan_pallas`) and its defaults
(`tuning`). Model code calls the dispatcher `wmjax.ops.selective_scan.selective_scan`.
"""

from pallas_kernels.selective_scan.ops import selective_scan_pallas
from pallas_kernels.selective_scan.reference import segment_keep, selective_scan_ref, selective_scan_step

__all__ = ["selective_scan_pallas", "selective_scan_ref", "selective_scan_step", "segment_keep"]
