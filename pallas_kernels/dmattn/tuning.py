"""Tuned defaults of the flash dynamic-mask-attention kernels (H100, Triton backend, jax 0.11.2, 2026-11-23;
`bench/dmattn.py --tune` / `--tune-sparse`; figures in docs/KERNELS.md, Dynamic mask attention).

`override(**fields)` (benchmarks only) replaces DmattnConfig fields in every `default_config` inside the block.
"""

from __future__ import annotations

from pallas_kernels.dmattn.config import DmattnConfig
from pallas_kernels.overrides import TunedDefaults

__all__ = ["default_config", "override"]

_DEFAULTS = TunedDefaults(DmattnConfig)
override = _DEFAULTS.override


def default_config(head_dim: int, dtype, dense: bool = False) -> DmattnConfig:
    """GPU tiles by head dim. dense: L <= w (no pre-pass, contiguous key blocks; the training shape of every
    published Doge): fwd 128x64 / 8 warps / 3 stages, dq and dk/dv 64x64 / 4 warps / 2 stages. Sparse (L > w,
    d <= 128): 64x64 / 4 warps / 2 stages everywhere. d = 256: 64x32 / 32x64 tiles, 8 warps, 1 stage."""
    del dtype  # the same tiles for f32 / bf16 / f16
    if head_dim <= 128 and dense:
        base = DmattnConfig(block_q=128, block_k=64, num_warps_fwd=8, num_stages_fwd=3, block_q_dq=64, block_k_dq=64,
                            num_warps_dq=4, num_stages_dq=2, block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4,
                            num_stages_dkv=2)
    elif head_dim <= 128:
        base = DmattnConfig()
    else:
        base = DmattnConfig(block_q=64, block_k=32, num_warps_fwd=8, block_q_dq=64, block_k_dq=32, num_warps_dq=8,
                            block_q_dkv=32, block_k_dkv=64, num_warps_dkv=8, num_stages_fwd=1, num_stages_dq=1,
                            num_stages_dkv=1)
    return _DEFAULTS.apply(base)
