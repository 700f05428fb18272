"""``lane_xor``: exchange values between the lanes of a warp inside a Pallas Triton kernel (``shfl.sync.bfly``).

Triton sums a tile over an axis that lies on lanes with a butterfly: every value of the result costs log2(lanes)
shuffles and adds, and every lane ends up with every sum. A kernel that reduces many values at once over the same
lanes can instead halve the values at each round (a reduce-scatter: lanes with the round's bit 0 keep one half and
send the other, ``reduce_scatter``), log2 times fewer shuffles, each lane then owning a share of the sums.

``lane_xor(v, axis, m, lane_stride)`` is, as a tile operation, v with the index along `axis` xor'ed by m:
    out[..., i, ...] = v[..., i ^ m, ...]          (the axis a power of two, m < its size)
which is what ``shfl.sync.bfly`` by m lane_stride computes when the axis lies on lanes with index i at lane
i lane_stride (+ the other axes' lane offsets) in every register. That is a layout assumption the calling kernel
states and checks (Triton's default blocked layout: the last axis on the lowest lanes, ``selective_scan/kernels.py``):
here, in Pallas interpret mode and plain jit, the op is the permutation itself, so CPU tests check the algebra, and
the GPU check of the kernel (``bench/selective_scan.py``) the layout. The Triton rule is registered in Pallas' Triton
rule table through ``triton_rules``, like ``fastmath``'s.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.triton_rules import inline_asm, primitive

__all__ = ["lane_xor", "reduce_scatter", "scatter_origin"]


def _impl(v, *, axis, m, lane_stride):
    del lane_stride
    idx = jnp.arange(v.shape[axis]) ^ m
    return jnp.take(v, idx, axis=axis)


def _triton_rule(ctx, v, *, axis, m, lane_stride):
    del axis
    mask = m * lane_stride
    if not 0 < mask < 32:
        raise ValueError(f"lane_xor: lane mask {mask} (m {m} x lane stride {lane_stride}) is not inside a warp")
    return inline_asm(ctx, "lane_xor", f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, 0xffffffff;", v)


_lane_xor_p = primitive("wmjax_lane_xor", _impl, _triton_rule)


def lane_xor(v, axis, m, lane_stride):
    """v with its index along `axis` xor'ed by m (static; the axis size a power of two > m): a warp shuffle by
    m lane_stride lanes in a Triton kernel whose layout puts `axis` index i on lane i lane_stride (module doc)."""
    axis = axis % v.ndim
    size = v.shape[axis]
    if size & (size - 1) or not 0 < m < size:
        raise ValueError(f"lane_xor: axis {axis} of size {size} (a power of two) cannot be xor'ed by {m}")
    return _lane_xor_p.bind(v, axis=axis, m=int(m), lane_stride=int(lane_stride))


def reduce_scatter(items, axis, lane_stride):
    """Sums each of the tiles `items` (same shape; len a power of two) over `axis` (on lanes, lane_stride apart:
    module doc), scattering the sums over the lanes. Round k pairs item i with item i + h (h = len / 2^k) across the
    lanes differing in axis bit k - 1: the lane with bit 0 keeps item i, the other item i + h, and each adds the
    partner's copy of what it keeps (one shuffle per pair). Bits left once one item remains are summed whole
    (a butterfly). Returns (sums, origin): max(1, len(items) / 2^bits) tiles, and ``scatter_origin``'s origin."""
    size = items[0].shape[axis]
    nbits = size.bit_length() - 1
    idx = lax.broadcasted_iota(jnp.int32, items[0].shape, axis)
    items = list(items)
    origin = scatter_origin(items[0].shape, axis, len(items))
    for k in range(nbits):
        bit = (idx >> k) & 1
        h = len(items) // 2
        if h == 0:
            items = [items[0] + lane_xor(items[0], axis, 1 << k, lane_stride)]
            continue
        hi = bit == 1
        nxt = []
        for i in range(h):
            lo_item, hi_item = items[i], items[i + h]
            keep = jnp.where(hi, hi_item, lo_item)
            send = jnp.where(hi, lo_item, hi_item)
            nxt.append(keep + lane_xor(send, axis, 1 << k, lane_stride))
        items = nxt
    return items, origin


def scatter_origin(shape, axis, count):
    """Where ``reduce_scatter`` of `count` items of `shape` over `axis` leaves each sum: origin(j), an int32 tile of
    `shape` whose entry is the index of the item whose full sum its slot j holds there (per lane: entries along
    `axis` differ; with fewer items than lanes, lanes / count entries hold each sum). A function of the shapes only,
    so it may be built outside the loop that scatters."""
    nbits = shape[axis].bit_length() - 1
    idx = lax.broadcasted_iota(jnp.int32, shape, axis)
    offsets, h = [], count // 2
    for k in range(nbits):
        if h == 0:
            break
        offsets.append((h, (idx >> k) & 1))
        h //= 2

    def origin(j):
        o = jnp.full(shape, j, jnp.int32)
        for h, bit in offsets:
            o = o + h * bit
        return o

    return origin
