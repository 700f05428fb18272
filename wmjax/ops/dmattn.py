"""Dynamic Mask Attention (DMA) dispatcher: the plain-jnp reference or the flash Pallas kernel, per shard.

Semantics, shapes and the reference: `pallas_kernels.dmattn.reference` (docs/DOGE.md, Dynamic mask attention);
the kernel: `pallas_kernels.dmattn` (O(L) memory, GPU).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.dmattn import dynamic_mask_attention_pallas, supports
from pallas_kernels.dmattn.reference import dynamic_mask_attention_reference

__all__ = ["dynamic_mask_attention"]


def _kernel_partition_specs(query, key, key_bias):
    """Batch / head mesh axes for running the kernel per shard, from the active mesh and flax logical rules.

    A Pallas custom call has no sharding rule: under GSPMD its operands would be all-gathered and every device
    would run the whole batch. So when a mesh is active (``jax.set_mesh``) and the logical rules
    (``nn.logical_axis_rules``) map ``activation_batch`` / ``activation_kv_heads`` to mesh axes, the dispatcher
    runs the kernel inside ``jax.shard_map`` over those axes (each shard: its batch rows, its kv-head group
    with the matching query heads). Returns (batch_axes, head_axes) or None when there is nothing to split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return None  # already inside a shard_map: operands are local

    def axes_for(name, dim):
        spec = nn.logical_to_mesh_axes((name,))[0]
        if spec is None:
            return ()
        spec = (spec,) if isinstance(spec, str) else tuple(spec)
        spec = tuple(a for a in spec if a in mesh.axis_names and mesh.shape[a] > 1)
        size = 1
        for a in spec:
            size *= mesh.shape[a]
        return spec if spec and dim % size == 0 else ()

    try:
        batch_axes = axes_for("activation_batch", query.shape[0])
        head_axes = axes_for("activation_kv_heads", key.shape[2])
    except Exception:  # no logical rules in context
        return None
    if head_axes:
        size = 1
        for a in head_axes:
            size *= mesh.shape[a]
        if query.shape[2] % size or key_bias.shape[1] % size:
            head_axes = ()
    if not batch_axes and not head_axes:
        return None
    return batch_axes, head_axes


def _sharded_kernel_call(kernel_fn, axes, query, key, value, key_bias, kwargs):
    """Run `kernel_fn` per shard with jax.shard_map (see `_kernel_partition_specs`)."""
    batch_axes, head_axes = axes
    bt = batch_axes or None
    hd = head_axes or None
    names = ("query_positions", "key_positions", "key_mask", "query_segment_ids", "key_segment_ids")
    arrays = {n: kwargs[n] for n in names if kwargs.get(n) is not None}
    static = {n: v for n, v in kwargs.items() if n not in names}
    in_specs = (P(bt, None, hd, None), P(bt, None, hd, None), P(bt, None, hd, None), P(bt, hd, None),
                {n: P(bt, None) for n in arrays})

    def local(q, k, v, kb, arr):
        return kernel_fn(q, k, v, kb, **arr, **static)

    mesh = jax.sharding.get_abstract_mesh()
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):  # explicit sharding: reshard first
        query, key, value, key_bias, arrays = jax.tree_util.tree_map(
            jax.reshard, (query, key, value, key_bias, arrays), in_specs)
    return jax.shard_map(local, in_specs=in_specs, out_specs=P(bt, None, hd, None), check_vma=False)(
        query, key, value, key_bias, arrays)


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except Exception:  # pragma: no cover
        return False


def dynamic_mask_attention(
    query, key, value, key_bias, *, keep_window_size, query_positions, key_positions, key_mask=None,
    query_segment_ids=None, key_segment_ids=None, sliding_window=None, scale=None, implementation=None,
):
    """Dispatcher: `implementation` in {None (auto), "reference", "pallas"}.

    Auto picks the Pallas kernel on GPU when it supports the call (`pallas_kernels.dmattn.supports`) and the
    reference elsewhere. Under an active mesh the kernel runs per shard (`_kernel_partition_specs`).
    Shapes and semantics: `pallas_kernels.dmattn.reference.dynamic_mask_attention_reference`.
    """
    kwargs = dict(keep_window_size=keep_window_size, query_positions=query_positions, key_positions=key_positions,
                  key_mask=key_mask, query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
                  sliding_window=sliding_window, scale=scale)
    if implementation not in (None, "reference", "pallas"):
        raise ValueError(f"dynamic_mask_attention: implementation={implementation!r}; "
                         "expected None, 'reference' or 'pallas'")
    if implementation == "reference":
        return dynamic_mask_attention_reference(query, key, value, key_bias, **kwargs)
    if implementation == "pallas" or _on_gpu():
        if supports(query, key, value, key_bias, **kwargs):
            axes = _kernel_partition_specs(query, key, key_bias)
            if axes is not None:
                return _sharded_kernel_call(dynamic_mask_attention_pallas, axes, query, key, value, key_bias, kwargs)
            return dynamic_mask_attention_pallas(query, key, value, key_bias, **kwargs)
        if implementation == "pallas":
            raise ValueError("dynamic_mask_attention: the Pallas kernel does not support this call "
                             f"(q {query.shape}, k {key.shape}, bias {key_bias.shape}, segments="
                             f"{query_segment_ids is not None}, sliding_window={sliding_window})")
    return dynamic_mask_attention_reference(query, key, value, key_bias, **kwargs)
