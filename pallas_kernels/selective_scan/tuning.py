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
    """Each program holds [T, N1, BE, N2] f32 tiles (the chunk's decays, inputs, states; the backward also the
    adjoint), the state axis split as n = n1 N2 + n2. Triton's default layout gives the N2 states to lanes, then
    32 / N2 lanes and the warps to channels, and keeps T, N1 and the remaining channels inside a thread: sums over
    the state are adds in a thread plus log2(N2) shuffle rounds, sums over channels (dB, dC) adds in a thread plus
    log2(32 / N2) rounds (and shared memory across warps), and the scan over T runs in a thread. Parallelism is
    b E N2 / (channels per thread) threads, times the parts (sequence parallelism, below). The forward and the
    backward split the state their own way (the saved states are channel-major, [b, L/T, E, N]): the forward has one
    sum over the state (y) and none over channels, the backward two of each. Defaults (0 = by the state size N, a
    power of two), chosen by the H200 sweeps of bench/selective_scan.py (docs/BENCHMARKS.md):
      N <= 32: T = 8; forward N2 = 4, BE 16 at 1 warp (2 channels a thread), parts; backward N2 = 8, BE 8 at 1
               warp, 2 sub-blocks, parts;
      N > 32:  T = 8; N2 = 16; forward BE 8 at 4 warps, no parts; backward BE 2 at 1 warp, 2 sub-blocks, parts.
    chunk: tokens per chunk T of the forward kernels (the scanned axis). A power of two.
    chunk_bwd: tokens per chunk of the backward kernels, a power of two dividing chunk (0 = chunk); also the interval
      of the states the forward saves for the backward ([b, L / chunk_bwd, E, N] f32: 2 N / chunk_bwd times the
      bytes of a bf16 x), read from inside the forward's chunks. Shorter backward tiles hold fewer registers.
    lanes_n_fwd / lanes_n_bwd: N2, lanes over the state (a power of two, at most N) of the forward kernels (with or
      without saved states) and of the backward kernels.
    block_e_fwd / block_e_bwd: channels per program (per backward sub-block), powers of two, at most the
      (power-of-two) channel count; 0 = (32 / N2) warps (times 2 for N <= 32).
    sub_blocks_bwd: S, blocks of block_e_bwd channels per backward program, walked one after the other inside each
      chunk (static loop, S copies of the chunk code): the dB / dC partial sums per token drop from E / BE to
      E / (S BE) ([b, E / (S BE), L, N] f32 each, written and summed once), at S times fewer programs.
    groups_bwd: K, groups of S sub-blocks per backward program, walked in a dynamic loop inside each chunk (one
      copy of the code), each group's carries (adjoint, dA, dD, d dt_bias) kept in memory between chunks and the
      chunk's dB / dC summed over the groups in registers: the partials K times fewer again ([b, E / (K S BE), L, N]),
      at K times fewer programs (more parts) and a few L1-resident loads and stores per group and chunk; halved
      while K / 2 groups still cover the channels (as block_e is); 0 = 1.
    part_programs_fwd / part_programs_bwd: sequence parallelism. The sequence is cut into P parts of whole chunks,
      each a program (grid axis), when the (batch row, channel block) programs are fewer than part_programs: P (a
      power of two) doubles while programs P < part_programs and each part keeps >= 4 chunks (the chunk count is
      padded to whole parts). A light pass first computes every part's summary (forward: end state from zero and
      decay product; backward: adjoint at its start and decay product), one more exp per element. -1: no parts.
    prefetch_fwd / prefetch_bwd: load the next chunk's rows before computing the current one (a double buffer in
      registers); the backward's part pass always does (few registers, latency bound on its loads); the backward
      itself only with K = 1.
    scatter_bwd: the backward's sums over the state's lanes (du, d delta) and over the channels' lanes (dB, dC)
      scatter their results over the lanes (``lanes.reduce_scatter``: log2(lanes) times fewer shuffles, each lane
      writing its share) where the layout allows it (one warp, 32 distinct (channel, state) lanes); False: Triton's
      butterfly sums, every lane holding every sum.
    num_warps_* / num_stages_*: Triton launch parameters (warps 0 = by N, above)."""
    chunk: int = 0
    chunk_bwd: int = 0
    lanes_n_fwd: int = 0
    lanes_n_bwd: int = 0
    block_e_fwd: int = 0
    block_e_bwd: int = 0
    sub_blocks_bwd: int = 0
    groups_bwd: int = 0
    part_programs_fwd: int = 0
    part_programs_bwd: int = 0
    num_warps_fwd: int = 0
    num_warps_bwd: int = 0
    num_stages_fwd: int = 2
    num_stages_bwd: int = 2
    prefetch_fwd: bool = True
    prefetch_bwd: bool = False
    scatter_bwd: bool = True

    def chunk_for(self, n: int) -> int:
        """Tokens per forward chunk for state size n (a power of two)."""
        return self.chunk or 8

    def chunk_bwd_for(self, n: int) -> int:
        """Tokens per backward chunk (the saved states' interval) for state size n (a power of two)."""
        return self.chunk_bwd or self.chunk_for(n)

    def lanes_for(self, kernel: str, n: int) -> int:
        """Lanes over the state, N2, of `kernel` ("fwd" | "bwd") for state size n (a power of two)."""
        default = 16 if n > 32 else (4 if kernel == "fwd" else 8)
        return min(n, getattr(self, "lanes_n_" + kernel) or default)

    def warps(self, kernel: str, n: int) -> int:
        """Warps of `kernel` ("fwd" | "bwd") for state size n."""
        return getattr(self, "num_warps_" + kernel) or (4 if kernel == "fwd" and n > 32 else 1)

    def parts(self, kernel: str, nc: int, programs: int, n: int) -> int:
        """Parts P of `kernel` for nc chunks, `programs` (batch row, channel block) programs and state size n."""
        target = getattr(self, "part_programs_" + kernel) or (0 if kernel == "fwd" and n > 32 else 4096)
        parts = 1
        while programs * parts < target and nc // (2 * parts) >= 4:
            parts *= 2
        return parts

    def sub_blocks_for(self, n: int) -> int:
        """Backward sub-blocks for state size n (a power of two)."""
        return self.sub_blocks_bwd or 2

    def groups_for(self, n: int, e: int) -> int:
        """Backward channel groups K for state size n (a power of two) and e channels: no more than fill them
        (halved while K / 2 groups of S block_e_bwd channels still cover e)."""
        k, per_group = self.groups_bwd or 1, self.block_e("bwd", n, e) * self.sub_blocks_for(n)
        while k > 1 and k & (k - 1) == 0 and per_group * (k // 2) >= e:
            k //= 2
        return k

    def block_e(self, kernel: str, n: int, e: int) -> int:
        """Channels per program (backward: per sub-block) of `kernel` ("fwd" | "bwd") for state size n (a power of
        two) and e channels."""
        be = self.block_e_fwd if kernel == "fwd" else self.block_e_bwd
        if not be:
            be = max(1, 32 // self.lanes_for(kernel, n)) * self.warps(kernel, n) * (2 if n <= 32 else 1)
        while be > 1 and be // 2 >= e:   # no wider than the channels themselves
            be //= 2
        return be

    def launch(self, kernel: str, n: int) -> dict:
        """`kernel`'s launch keywords for state size n (a power of two)."""
        out = dict(num_warps=self.warps(kernel, n), num_stages=getattr(self, "num_stages_" + kernel),
                   prefetch=getattr(self, "prefetch_" + kernel))
        if kernel == "bwd":
            out["sub_blocks"] = self.sub_blocks_for(n)
            out["scatter"] = self.scatter_bwd
        return out


_DEFAULTS = TunedDefaults(SelectiveScanTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
