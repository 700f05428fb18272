"""The tau pre-pass, key-centric: one expiry row e_j per key instead of an [L, L] mask.

Row i keeps key j (j <= i, both real) iff fewer than w real keys k <= i have bias_k > bias_j (= bias_j >= tau_i, ties
kept), so key j is kept by the contiguous rows [j, e_j), e_j = max(j, p_j), p_j the w-th smallest index among the
keys with a larger bias (BIG if fewer than w); padding keys get e_j = j. All O(L) memory per (batch, kv head):
  `sort_ranks` (XLA sort: rank of each key, count of strictly larger keys), `key_expiry` (`_expiry_kernel`, grid
  (L / expiry_block_j, n): a block of consecutive ranks scans the keys in index order until each has seen w larger
  keys), `query_block_lists` (`_lists_kernel`, grid (L / block_q, n): per query block at row i0 the earlier keys
  with e_j > i0, at most w of them without ties), `dkv_key_order` (keys sorted by e_j within aligned groups).
Details: docs/KERNELS.md, Dynamic mask attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.dmattn.config import BIG, DmattnConfig, compiler_params, round_up

__all__ = ["key_expiry", "query_block_lists", "dkv_key_order", "sort_ranks"]


def sort_ranks(bias_masked):
    """bias_masked [n, L] f32 (-inf = padding). Returns (srank [n, L] int32: rank of key k in a stable
    descending sort; r_sorted [n, L] int32: for rank s, the number of keys strictly larger than that key)."""
    n, length = bias_masked.shape
    iota = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    neg = -bias_masked
    sv, perm = jax.lax.sort((neg, iota), dimension=1, num_keys=1, is_stable=True)
    new_group = jnp.concatenate([jnp.ones((n, 1), bool), sv[:, 1:] != sv[:, :-1]], axis=1)
    r_sorted = jax.lax.cummax(jnp.where(new_group, iota, 0), axis=1)
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    srank = jnp.zeros((n, length), jnp.int32).at[rows, perm].set(iota, unique_indices=True)
    return srank, r_sorted, perm


def _expiry_kernel(*refs, w, bx, nx, segmented):
    if segmented:
        r_ref, segj_ref, endj_ref, srank_ref, segx_ref, p_ref = refs
        seg_j = segj_ref[...]
        end_j = endj_ref[...]
    else:
        r_ref, srank_ref, p_ref = refs
    r = r_ref[...]  # [bj] strict-greater counts of this block's keys (consecutive ranks)
    bj = r.shape[0]
    done0 = (r < w).astype(jnp.int32)  # fewer than w larger keys: never expires
    lane = jax.lax.broadcasted_iota(jnp.int32, (bj, bx), 1)

    def cond(c):
        xb, _, _, done = c
        go = (xb < nx) & (jnp.min(done) == 0)
        if segmented:  # no key's segment reaches this far: stop
            go = go & (xb * bx < jnp.max(jnp.where(done == 0, end_j, 0)))
        return go

    def body(c):
        xb, cnt, p, done = c
        sl = pl.ds(pl.multiple_of(xb * bx, bx), bx)
        sr = srank_ref[sl]
        larger = sr[None, :] < r[:, None]  # [bj, bx]: key k (index order) larger than key j
        if segmented:
            larger = larger & (segx_ref[sl][None, :] == seg_j[:, None])
        ind = larger.astype(jnp.int32)
        tot = cnt + jnp.sum(ind, axis=1)
        cross = (done == 0) & (tot >= w)

        def find(p):
            cum = cnt[:, None] + jnp.cumsum(ind, axis=1)
            pos = jnp.min(jnp.where(cum >= w, xb * bx + lane, BIG), axis=1)
            return jnp.where(cross, pos, p)

        p = jax.lax.cond(jnp.max(cross.astype(jnp.int32)) > 0, find, lambda p: p, p)
        return xb + 1, tot, p, jnp.maximum(done, cross.astype(jnp.int32))

    init = (jnp.int32(0), jnp.zeros((bj,), jnp.int32), jnp.full((bj,), BIG, jnp.int32), done0)
    _, _, p, _ = jax.lax.while_loop(cond, body, init)
    p_ref[...] = p


def segment_ends(seg):
    """seg [n, L] int32 (documents = contiguous runs) -> [n, L] int32: one past the last index of each run."""
    n, length = seg.shape
    idx = jnp.arange(length, dtype=jnp.int32)[None, :]
    last = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones((n, 1), bool)], axis=1)
    return jax.lax.cummin(jnp.where(last, idx + 1, BIG), axis=1, reverse=True)


def key_expiry(bias_masked, valid, keep_window_size: int, cfg: DmattnConfig, seg=None):
    """bias_masked [n, L] f32 (-inf at padding), valid [n, L] bool, seg [n, L] int32 or None (packed documents:
    contiguous runs; only keys of the same run count, and e_j stops at the run's end) -> e [n, L] int32."""
    n, length = bias_masked.shape
    bj, bx = cfg.expiry_block_j, min(cfg.expiry_block_x, round_up(length, 16))
    assert length % bj == 0, (length, bj)
    srank, r_sorted, perm = sort_ranks(bias_masked)
    lx = round_up(length, bx)
    srank_p = jnp.pad(srank, ((0, 0), (0, lx - length)), constant_values=BIG)
    segmented = seg is not None
    kernel = functools.partial(_expiry_kernel, w=keep_window_size, bx=bx, nx=lx // bx, segmented=segmented)
    jspec = pl.BlockSpec((None, bj), lambda s, i: (i, s))
    xspec = pl.BlockSpec((None, lx), lambda s, i: (i, 0))
    if segmented:
        ends = segment_ends(seg)
        seg_sorted = jnp.take_along_axis(seg, perm, axis=1)
        end_sorted = jnp.take_along_axis(ends, perm, axis=1)
        seg_p = jnp.pad(seg, ((0, 0), (0, lx - length)))
        args, in_specs = (r_sorted, seg_sorted, end_sorted, srank_p, seg_p), [jspec, jspec, jspec, xspec, xspec]
    else:
        args, in_specs = (r_sorted, srank_p), [jspec, xspec]
    p_sorted = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n, length), jnp.int32),
        grid=(length // bj, n),
        in_specs=in_specs,
        out_specs=jspec,
        compiler_params=compiler_params(cfg.num_warps_aux, 1),
        interpret=cfg.interpret,
        name="dmattn_key_expiry",
    )(*args)
    p = jnp.take_along_axis(p_sorted, srank, axis=1)  # back to index order
    j = jnp.arange(length, dtype=jnp.int32)[None, :]
    e = jnp.minimum(jnp.maximum(p, j), length)
    if segmented:
        e = jnp.minimum(e, ends)
    return jnp.where(valid, e, j)


def _lists_kernel(e_ref, lst_ref, cnt_ref, *, block_q, chunk, cap):
    t = pl.program_id(0)
    i0 = t * block_q
    lane = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)

    def body(c, cnt):
        j = c * chunk + lane
        e = e_ref[pl.ds(pl.multiple_of(c * chunk, chunk), chunk)]
        m = (j < i0) & (e > i0)
        pos = cnt + jnp.cumsum(m.astype(jnp.int32)) - 1
        ok = m & (pos < cap)
        # lanes that write nothing get distinct slots past the capacity (no duplicate scatter indices)
        pltr.store(lst_ref.at[jnp.where(ok, pos, cap + lane)], j, mask=ok)
        return cnt + jnp.sum(m.astype(jnp.int32))

    cnt = jax.lax.fori_loop(0, (i0 + chunk - 1) // chunk, body, jnp.int32(0))
    cnt_ref[...] = jnp.full((1,), cnt, jnp.int32)


def query_block_lists(e, block_q: int, cap: int, cfg: DmattnConfig):
    """e [n, L] -> (lists [n, nq, cap + chunk] int32, counts [n, nq] int32): per query block t (rows
    [t*block_q, (t+1)*block_q)), the earlier keys j < t*block_q with e_j > t*block_q, in index order (first
    min(count, cap) entries valid)."""
    n, length = e.shape
    nq = length // block_q
    chunk = min(cfg.list_chunk, round_up(length, 16))
    lc = round_up(length, chunk)
    e_p = jnp.pad(e, ((0, 0), (0, lc - length)))
    width = cap + chunk
    kernel = functools.partial(_lists_kernel, block_q=block_q, chunk=chunk, cap=cap)
    lists, counts = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n, nq, width), jnp.int32), jax.ShapeDtypeStruct((n, nq), jnp.int32)),
        grid=(nq, n),
        in_specs=[pl.BlockSpec((None, lc), lambda t, i: (i, 0))],
        out_specs=[pl.BlockSpec((None, None, width), lambda t, i: (i, t, 0)),
                   pl.BlockSpec((None, 1), lambda t, i: (i, t))],
        compiler_params=compiler_params(cfg.num_warps_aux, 1),
        interpret=cfg.interpret,
        name="dmattn_query_block_lists",
    )(e_p)
    return lists, counts


def dkv_key_order(e, group: int):
    """e [n, L] -> perm [n, L] int32: keys sorted by e within aligned groups of `group` keys (stable)."""
    n, length = e.shape
    iota = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    _, _, perm = jax.lax.sort((iota // group, e, iota), dimension=1, num_keys=2, is_stable=True)
    return perm
