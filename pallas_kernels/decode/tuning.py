"""Tuned defaults of the decode kernels as the fused decode step calls them (H100, Doge-160M, bf16, jax 0.11.2,
2026-11-23; `bench/sample.py --decode-kernels` and `--kernels fused`; figures in docs/KERNELS.md, Decode).

`override(**fields)` (benchmarks only) replaces fields of `current()` inside the block.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.overrides import TunedDefaults

__all__ = ["DecodeTuning", "current", "override"]


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """cache_block: the attention kernel's cache block (the cache is padded to a multiple); attention_warps /
    attention_stages: its Triton launch. Projections (`decode_linear`): block_k (K chunk), linear_warps /
    linear_stages; dot form (batch > 1, rows padded to 16): block_n output columns per program, block_n_swiglu
    for the two-weight gate/up projection, logits_block_n for the LM head (the vocab is padded to a multiple);
    gemv form (batch 1): gemv_block_n, gemv_logits_block_n (a divisor of logits_block_n), gemv_warps."""
    cache_block: int = 128
    attention_warps: int = 4
    attention_stages: int = 3
    block_k: int = 256
    linear_warps: int = 4
    linear_stages: int = 3
    block_n: int = 16
    block_n_swiglu: int = 32
    logits_block_n: int = 64
    gemv_block_n: int = 4
    gemv_logits_block_n: int = 8
    gemv_warps: int = 1

    def __post_init__(self):
        if self.logits_block_n % self.gemv_logits_block_n:
            raise ValueError(f"DecodeTuning: gemv_logits_block_n={self.gemv_logits_block_n} must divide "
                             f"logits_block_n={self.logits_block_n} (the vocab is padded to the latter)")


_DEFAULTS = TunedDefaults(DecodeTuning)
current = _DEFAULTS.apply
override = _DEFAULTS.override
