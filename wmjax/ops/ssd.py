"""Mamba-2 SSD scan dispatcher (Pallas kernels on GPU, the chunked jnp form elsewhere) and the decode step.

Shapes, the recurrence and the references: `pallas_kernels.ssd.reference`; the kernels: `pallas_kernels.ssd`.
"""

from __future__ import annotations

import jax

from pallas_kernels.ssd import ssd_pallas
from pallas_kernels.ssd.reference import ssd_chunked, ssd_naive, ssd_step

__all__ = ["ssd", "ssd_step"]


def ssd(x, dt, A, B, C, *, chunk_size=256, D=None, z=None, initial_state=None, segment_ids=None,
        return_final_state=False, implementation=None, interpret=None):
    """SSD scan y = SSD(x, dt, A, B, C) (+ D x, * silu(z)); shapes and equations: `pallas_kernels.ssd.reference`.

    implementation: None (Pallas kernels on GPU when chunk_size is a power of two >= 16, else the chunked jnp
      reference), "pallas", "chunked", "naive".  The Pallas path is mathematically the chunked algorithm
      (chunk states, sequential state passing, intra-chunk quadratic form); bf16 inputs use bf16 matmul
      operands with f32 accumulation, f32 inputs IEEE f32 dots.
    interpret: only for implementation "pallas": run the kernels in Pallas interpret mode (None: True iff the
      default backend is not a GPU). Never needed on GPU.
    Returns y [b, L, h, p] (x.dtype), or (y, final_state [b, h, p, n] f32) if return_final_state.
    All implementations are differentiable (the Pallas one through jax.custom_vjp kernels).
    """
    backend = jax.default_backend()
    if implementation is None:
        q = int(chunk_size)
        kernel_ok = q >= 16 and q & (q - 1) == 0  # the kernels need a power-of-two chunk
        implementation = "pallas" if (backend == "gpu" and kernel_ok) else "chunked"
    if implementation == "pallas":
        if interpret is None:
            interpret = backend != "gpu"
        y, final = ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, initial_state=initial_state,
                              segment_ids=segment_ids, interpret=interpret)
    elif implementation == "chunked":
        y, final = ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, initial_state=initial_state,
                               segment_ids=segment_ids)
    elif implementation == "naive":
        y, final = ssd_naive(x, dt, A, B, C, D=D, z=z, initial_state=initial_state, segment_ids=segment_ids)
    else:
        raise ValueError(f"ssd: implementation={implementation!r}; expected None, 'pallas', 'chunked' or 'naive'")
    return (y, final) if return_final_state else y
