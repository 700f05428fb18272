"""Defaults of the selective-scan kernels, measured on an H200 with `bench/selective_scan.py --nvar 6` (the
variant sweep; figures in docs/BENCHMARKS.md, Selective scan).

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
    power of two), register counts checked with Triton 3.9 + ptxas for sm_90 on CPU, chunk and sub-blocks chosen by
    the H200 sweep:
      N <= 32: T = 32, forward tile 4096 (N = 16: BE = 8), backward tile 2048 (BE = 4), 1 sub-block (2 were
               1.24 vs 0.98 ms fwd+bwd at b4 L2048 E768 N16);
      N > 32:  T = 16, forward tile 2048 (N = 64: BE = 2), backward tile 1024 (BE = 1), 2 sub-blocks. T = 8 (BE 4 /
               2) was faster in the kernel sweep (4.49 vs 5.66 ms fwd+bwd at b4 L2048 E768 N64), but the one
               OTCE-160M CLI run with it did not finish 150 steps in 170 s where T = 16 had taken 122 s; it stays
               a variant until a training run measures it.
    chunk: tokens per chunk T (the scanned axis; also the interval of the states the forward saves for the backward,
      [b, L/T, E, N] f32: 2N/T times the bytes of a bf16 x). A power of two.
    block_e_fwd / block_e_bwd: channels per program (per backward sub-block), powers of two; 0 = tile / (T N), at
      least 1, at most the (power-of-two) channel count.
    tile_fwd / tile_bwd: the T BE N budget used when block_e_* is 0 (0 = the defaults above).
    sub_blocks_bwd: S (0 = by N, above), blocks of block_e_bwd channels per backward program, walked one after the
      other inside each chunk (static loop, S copies of the chunk code): the dB / dC partial sums per token drop
      from E / BE to E / (S BE) ([b, E / (S BE), L, N] f32 each, written and summed once), at S times fewer programs.
    prefetch_fwd / prefetch_bwd: load the next chunk's rows before computing the current one (a double buffer in
      registers; off in the backward, whose registers are the tighter).
    num_warps_* / num_stages_*: Triton launch parameters."""
    chunk: int = 0
    block_e_fwd: int = 0
    block_e_bwd: int = 0
    tile_fwd: int = 0
    tile_bwd: int = 0
    sub_blocks_bwd: int = 0
    num_warps_fwd: int = 4
    num_warps_bwd: int = 4
    num_stages_fwd: int = 2
    num_stages_bwd: int = 2
    prefetch_fwd: bool = True
    prefetch_bwd: bool = False

    def chunk_for(self, n: int) -> int:
        """Tokens per chunk for state size n (a power of two)."""
        return self.chunk or (32 if n <= 32 else 16)

    def sub_blocks_for(self, n: int) -> int:
        """Backward sub-blocks for state size n (a power of two)."""
        return self.sub_blocks_bwd or (1 if n <= 32 else 2)

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

    def launch(self, kernel: str, n: int) -> dict:
        """`kernel`'s launch keywords for state size n (a power of two)."""
        out = dict(num_warps=getattr(self, "num_warps_" + kernel), num_stages=getattr(self, "num_stages_" + kernel),
                   prefetch=getattr(self, "prefetch_" + kernel))
        if kernel == "bwd":
            out["sub_blocks"] = self.sub_blocks_for(n)
        return out


_DEFAULTS = TunedDefaults(SelectiveScanTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
