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
    """Each program holds [T, BE, N] f32 tiles (the chunk's decays, inputs, states; the backward also the adjoint).
    Triton lays them out with T inside a thread, so a thread holds T BE N / (32 warps) elements of each 3-D array
    and T of each [T, BE] / [T, N] one: T BE N is what the registers bound. Defaults (0 = by the state size N, a
    power of two), checked with Triton 3.9 + ptxas for sm_90 on CPU (registers, no spills), not timed on a GPU:
      N <= 32: T = 32, forward tile 4096 (N = 16: BE = 8, 128 registers), backward tile 2048 (BE = 4, 2 sub-blocks:
               ~220 registers);
      N > 32:  T = 16, forward tile 2048 (N = 64: BE = 2, ~168 registers), backward tile 1024 (BE = 1, 2 sub-blocks:
               ~168 registers).
    chunk: tokens per chunk T (the scanned axis; also the interval of the states the forward saves for the backward,
      [b, L/T, E, N] f32: 2N/T times the bytes of a bf16 x). A power of two.
    block_e_fwd / block_e_bwd: channels per program (per backward sub-block), powers of two; 0 = tile / (T N), at
      least 1, at most the (power-of-two) channel count.
    tile_fwd / tile_bwd: the T BE N budget used when block_e_* is 0 (0 = the defaults above).
    sub_blocks_bwd: S, blocks of block_e_bwd channels per backward program, walked one after the other inside each
      chunk (static loop, S copies of the chunk code): the dB / dC partial sums per token drop from E / BE to
      E / (S BE) ([b, E / (S BE), L, N] f32 each, written and summed once), at S times fewer programs.
    prefetch_fwd / prefetch_bwd: load the next chunk's rows before computing the current one (a double buffer in
      registers; off in the backward, whose registers are the tighter).
    num_warps_* / num_stages_*: Triton launch parameters."""
    chunk: int = 0
    block_e_fwd: int = 0
    block_e_bwd: int = 0
    tile_fwd: int = 0
    tile_bwd: int = 0
    sub_blocks_bwd: int = 2
    num_warps_fwd: int = 4
    num_warps_bwd: int = 4
    num_stages_fwd: int = 2
    num_stages_bwd: int = 2
    prefetch_fwd: bool = True
    prefetch_bwd: bool = False

    def chunk_for(self, n: int) -> int:
        """Tokens per chunk for state size n (a power of two)."""
        return self.chunk or (32 if n <= 32 else 16)

    def block_e(self, kernel: str, n: int, e: int) -> int:
        """Channels per program (backward: per sub-block) of `kernel` ("fwd" | "bwd") for state size n (a power of
        two) and e channels."""
        be = self.block_e_fwd if kernel == "fwd" else self.block_e_bwd
        if not be:
            tile = self.tile_fwd if kernel == "fwd" else self.tile_bwd
            if not tile:
                tile = {"fwd": 4096, "bwd": 2048}[kernel] if n <= 32 else {"fwd": 2048, "bwd": 1024}[kernel]
            be = max(1, tile // (self.chunk_for(n) * n))
        while be > 1 and be // 2 >= e:   # no wider than the channels themselves
            be //= 2
        return be

    def launch(self, kernel: str) -> dict:
        out = dict(num_warps=getattr(self, "num_warps_" + kernel), num_stages=getattr(self, "num_stages_" + kernel),
                   prefetch=getattr(self, "prefetch_" + kernel))
        if kernel == "bwd":
            out["sub_blocks"] = self.sub_blocks_bwd
        return out


_DEFAULTS = TunedDefaults(SelectiveScanTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
