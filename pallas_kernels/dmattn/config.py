"""Static configuration (tiles, warps, stages) and shared helpers of the flash dynamic-mask-attention kernels.

The tuned values per head dim live in `tuning.py` (`default_config`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltr

BIG = 1 << 30  # "never expires" (larger than any sequence length)


@dataclasses.dataclass(frozen=True)
class DmattnConfig:
    """Static kernel configuration (hashable: it is a nondiff argument of the custom_vjp).

    block_q / block_k:          forward kernel tiles (query rows per program, keys per inner step).
    block_q_dq / block_k_dq:    dq kernel tiles.
    block_q_dkv / block_k_dkv:  dk/dv/d_bias kernel tiles (keys per program, query rows per inner step).
    expiry_block_j / expiry_block_x: tau pre-pass (key expiry) tiles: keys per program, keys scanned per step.
    list_chunk:                 keys scanned per step when building the per-query-block key lists.
    dkv_group:                  keys regrouped (by expiry row) within aligned groups of this many keys for the
                                dk/dv kernel, so a key block's row range is short; 0 = no regrouping.
    num_warps_* / num_stages_*: Triton compiler parameters per kernel.
    interpret:                  Pallas interpret mode (CPU tests only; never the GPU default).
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    expiry_block_j: int = 64
    expiry_block_x: int = 256
    list_chunk: int = 512
    dkv_group: int = 512
    num_warps_fwd: int = 4
    num_stages_fwd: int = 2
    num_warps_dq: int = 4
    num_stages_dq: int = 2
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    num_warps_aux: int = 4
    interpret: bool = False

    @property
    def seq_multiple(self) -> int:
        """The padded sequence length is a multiple of every tile size."""
        m = 1
        for v in (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dkv,
                  self.block_k_dkv, self.expiry_block_j):
            m = max(m, v)
        return m


def compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton backend (on jax 0.10.2 a bare pallas_call would lower to Mosaic GPU instead)."""
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype) -> Optional[jax.lax.Precision]:
    """f32 inputs: IEEE f32 dots (Triton's default for f32 is TF32); bf16/f16: the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m
