"""Block sizes, warps and shared helpers of the flash dynamic-mask-attention kernels (Pallas, Triton backend)."""

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
    dkv_order_packed:           build that order with one sort of short rows (one per group) of a packed int32 key
                                instead of a two-key sort over whole rows (the same permutation).
    num_warps_* / num_stages_*: Triton compiler parameters per kernel.
    dense_meta:                 dense mode (no key lists): skip the key blocks expired before a query block and run
                                tiles whose keys are all kept by all rows without a mask (per-block metadata from
                                e); in the dk/dv kernel, unmasked tiles for query blocks before every key's expiry.
    heavy_first:                launch order: the longest query blocks (fwd, dq) first.
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
    dkv_order_packed: bool = False
    num_warps_fwd: int = 4
    num_stages_fwd: int = 2
    num_warps_dq: int = 4
    num_stages_dq: int = 2
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    num_warps_aux: int = 4
    dense_meta: bool = True
    heavy_first: bool = True
    interpret: bool = False

    @property
    def seq_multiple(self) -> int:
        """The padded sequence length is a multiple of every tile size."""
        m = 1
        for v in (self.block_q, self.block_k, self.block_q_dq, self.block_k_dq, self.block_q_dkv,
                  self.block_k_dkv, self.expiry_block_j):
            m = max(m, v)
        return m


def default_config(head_dim: int, dtype, dense: bool = False) -> DmattnConfig:
    """GPU defaults by head dim (H100, Triton backend). dense: L <= w (no pre-pass, contiguous key blocks; the
    training shape of every published Doge). d=128 sparse picked by the bench/dmattn.py --sweep of 2026-11-23:
    fwd 64x64 / 4 warps, dq 4 warps, dk/dv 4 warps beat 128-row / 8-warp tiles by 10-30% per kernel; dk/dv with
    2 stages instead of 3 (--tune-sparse 2x8192=cur+s1+s2, H100, 2026-11-23): dk/dv 0.917 -> 0.578 ms, b2 L8192
    fwd+bwd 1.963 -> 1.624 ms (64x128 / 8 warps / 2 stages: 1.802)."""
    if head_dim <= 128 and dense:
        # bench/dmattn.py --tune 4x2048,16x2048 (H100, 2026-11-23, per-kernel profile): fwd 128x64 / 8 warps /
        # 3 stages 0.090 ms, dq 64x64 / 4 / 2 0.098, dk/dv 64x64 / 4 warps / 2 stages 0.141 (3 stages: 0.252)
        return DmattnConfig(block_q=128, block_k=64, num_warps_fwd=8, num_stages_fwd=3, block_q_dq=64, block_k_dq=64,
                            num_warps_dq=4, num_stages_dq=2, block_q_dkv=64, block_k_dkv=64, num_warps_dkv=4,
                            num_stages_dkv=2)
    if head_dim <= 128:
        return DmattnConfig()
    return DmattnConfig(block_q=64, block_k=32, num_warps_fwd=8, block_q_dq=64, block_k_dq=32, num_warps_dq=8,
                        block_q_dkv=32, block_k_dkv=64, num_warps_dkv=8, num_stages_fwd=1, num_stages_dq=1,
                        num_stages_dkv=1)


def compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton backend (on jax 0.10.2 a bare pallas_call would lower to Mosaic GPU instead)."""
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype) -> Optional[jax.lax.Precision]:
    """f32 inputs: IEEE f32 dots (Triton's default for f32 is TF32); bf16/f16: the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m
