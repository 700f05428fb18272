"""Mamba-1 selective scan dispatcher (Pallas kernels on GPU, the ``lax.scan`` definition elsewhere; per batch shard
under a mesh) and the decode step.

Shapes, the recurrence and the reference: `pallas_kernels.selective_scan.reference`; the kernels:
`pallas_kernels.selective_scan`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.selective_scan import selective_scan_pallas, selective_scan_ref, selective_scan_step

__all__ = ["selective_scan", "selective_scan_step"]


def _batch_axes(b):
    """Mesh axes that ``activation_batch`` maps to (flax logical rules) under the active mesh, when they divide b.

    A Pallas custom call has no sharding rule: under GSPMD its operands would be gathered and every device would
    scan the whole batch, so with such axes the kernel runs inside ``jax.shard_map`` over them (each shard: its
    batch rows; A, D, dt_bias replicated). None when there is nothing to split or we are already inside a shard_map.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None
    try:
        spec = nn.logical_to_mesh_axes(("activation_batch",))[0]
    except Exception:  # no logical rules in context
        return None
    if spec is None:
        return None
    spec = (spec,) if isinstance(spec, str) else tuple(spec)
    spec = tuple(a for a in spec if a in mesh.axis_names and mesh.shape[a] > 1)
    size = 1
    for a in spec:
        size *= mesh.shape[a]
    return spec if spec and b % size == 0 else None


def _pallas_per_shard(axes, arrays, static):
    """selective_scan_pallas(**arrays, **static) under jax.shard_map over the batch axes (see `_batch_axes`)."""
    replicated = ("A", "D", "dt_bias")
    specs = {n: (P() if n in replicated else P(axes)) for n in arrays}

    def local(arr):
        return selective_scan_pallas(**arr, **static)

    mesh = jax.sharding.get_abstract_mesh()
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit sharding: reshard first
        arrays = {n: jax.reshard(v, specs[n]) for n, v in arrays.items()}
    return jax.shard_map(local, in_specs=(specs,), out_specs=(P(axes), P(axes)), check_vma=False)(arrays)


def selective_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, segment_ids=None,
                   initial_state=None, return_final_state=False, impl=None, interpret=None):
    """Selective scan y = scan(x, dt, A, B, C) (+ D x, * silu(z)).

    x, dt, z [b, L, E]; A [E, N] f32 (negative: -exp(A_log)); B, C [b, L, N]; D, dt_bias [E]; segment_ids [b, L]
    (state reset at document starts; initial_state reaches only the first document); initial_state [b, E, N] f32.
    delta = softplus(dt + dt_bias) (or dt + dt_bias); h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t;
    y_t = h_t C_t + D x_t, times silu(z_t).

    impl: None (the Pallas kernels on GPU, the reference elsewhere), "pallas" or "reference". The kernels compute in
      float32 from inputs of any float dtype (bf16 inputs: f32 arithmetic, y rounded to bf16 once). Under a mesh
      whose logical rules map ``activation_batch`` to mesh axes, the kernels run per batch shard (shard_map).
    interpret: only for impl "pallas": run the kernels in Pallas interpret mode (None: True iff the default backend
      is not a GPU).
    Returns y [b, L, E] (x.dtype), or (y, final state [b, E, N] f32) if return_final_state. Both implementations are
    differentiable in every float argument (the Pallas one through jax.custom_vjp kernels).
    """
    backend = jax.default_backend()
    if impl is None:
        impl = "pallas" if backend == "gpu" else "reference"
    if impl == "pallas":
        if interpret is None:
            interpret = backend != "gpu"
        arrays = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, segment_ids=segment_ids,
                      initial_state=initial_state)
        arrays = {n: v for n, v in arrays.items() if v is not None}
        static = dict(dt_softplus=dt_softplus, interpret=interpret)
        axes = _batch_axes(x.shape[0])
        if axes is None:
            y, final = selective_scan_pallas(**arrays, **static)
        else:
            y, final = _pallas_per_shard(axes, arrays, static)
        return (y, final) if return_final_state else y
    if impl == "reference":
        return selective_scan_ref(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  segment_ids=segment_ids, initial_state=initial_state,
                                  return_final_state=return_final_state)
    raise ValueError(f"selective_scan: impl={impl!r}; expected None, 'pallas' or 'reference'")
