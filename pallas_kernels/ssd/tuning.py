"""Tuned defaults of the SSD kernels (H100, Triton backend, jax 0.11.2, 2026-11-23; `bench/ssd.py`; figures in
docs/KERNELS.md, SSD).

`override(**fields)` (benchmarks only) replaces fields of `current()` inside the block.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.overrides import TunedDefaults

__all__ = ["SsdTuning", "current", "override"]


@dataclasses.dataclass(frozen=True)
class SsdTuning:
    """block_t: rows per block inside a chunk (capped at the chunk; a power of two >= 16 dividing it).
    bwd_heads: at most this many heads of one B/C group per backward program (their dB / dC summed in registers).
    num_warps_fwd / num_warps_bwd: Triton warps of the forward / backward chunk kernels; num_warps_bwd_wide: the
    backward's when max(p, n) >= 128. num_stages_*: pipeline stages per kernel."""
    block_t: int = 64
    bwd_heads: int = 8
    num_warps_fwd: int = 4
    num_warps_bwd: int = 4
    num_warps_bwd_wide: int = 8
    num_stages_states_fwd: int = 2
    num_stages_states_bwd: int = 2
    num_stages_scan_fwd: int = 2
    num_stages_scan_bwd: int = 3

    def launch(self, kernel: str, p: int, n: int) -> dict:
        """Triton num_warps / num_stages of `kernel` in {states_fwd, states_bwd, scan_fwd, scan_bwd}."""
        if kernel.endswith("bwd"):
            warps = self.num_warps_bwd_wide if max(p, n) >= 128 else self.num_warps_bwd
        else:
            warps = self.num_warps_fwd
        return dict(num_warps=warps, num_stages=getattr(self, "num_stages_" + kernel))


_DEFAULTS = TunedDefaults(SsdTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
