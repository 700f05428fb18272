"""Defaults of the selective-scan kernels (chosen by reasoning, not yet measured on a GPU; `bench/selective_scan.py`
is the script that measures them).

`override(**fields)` (benchmarks and tests only) replaces fields of `current()` inside the block.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.overrides import TunedDefaults

__all__ = ["SelectiveScanTuning", "current", "override"]


@dataclasses.dataclass(frozen=True)
class SelectiveScanTuning:
    """chunk: tokens per chunk K, unrolled inside the kernels' loop over chunks; also the interval of the states the
    forward saves for the backward ([b, L/K, N, E] f32: 2N/K times the bytes of a bf16 x) and the number of states
    the backward keeps in registers. A power of two.
    block_e_fwd / block_e_bwd: channels per program (powers of two), capped so that the block's state holds at most
    max_state_fwd / max_state_bwd f32 elements (N * BE): N = 16 -> 16 / 32 channels, N = 64 -> 16 / 8.
    The forward runs one warp per program: each lane holds a few states of one channel, so the per-token sum over
    N stays inside a warp (with several warps Triton spreads N over them and that sum goes through shared memory
    with a barrier every token), and b E / 16 one-warp programs fill the SMs' schedulers. The backward also sums
    over channels every token (dB, dC) and keeps K states, so it uses wider blocks and 4 warps.
    prefetch_fwd / prefetch_bwd: load the next chunk's rows before computing the current one (double buffer in
    registers); the backward already has K recomputed states in registers, so it loads at the chunk start.
    num_warps_* / num_stages_*: Triton launch parameters."""
    chunk: int = 16
    block_e_fwd: int = 16
    block_e_bwd: int = 32
    max_state_fwd: int = 1024
    max_state_bwd: int = 512
    num_warps_fwd: int = 1
    num_warps_bwd: int = 4
    num_stages_fwd: int = 2
    num_stages_bwd: int = 2
    prefetch_fwd: bool = True
    prefetch_bwd: bool = False

    def block_e(self, kernel: str, n: int, e: int) -> int:
        """Channels per program of `kernel` ("fwd" | "bwd") for state size n (a power of two) and e channels."""
        cap = self.max_state_fwd if kernel == "fwd" else self.max_state_bwd
        be = self.block_e_fwd if kernel == "fwd" else self.block_e_bwd
        be = max(1, min(be, cap // n))
        while be > 1 and be // 2 >= e:   # no wider than the channels themselves
            be //= 2
        return be

    def launch(self, kernel: str) -> dict:
        return dict(num_warps=getattr(self, "num_warps_" + kernel), num_stages=getattr(self, "num_stages_" + kernel),
                    prefetch=getattr(self, "prefetch_" + kernel))


_DEFAULTS = TunedDefaults(SelectiveScanTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
