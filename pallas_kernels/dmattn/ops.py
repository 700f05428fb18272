"""The public op: `supports`, `dynamic_mask_attention_pallas` (custom_vjp wiring, padding, pre-pass)."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dmattn.backward import flash_backward
from pallas_kernels.dmattn.config import DmattnConfig, round_up
from pallas_kernels.dmattn.forward import flash_forward
from pallas_kernels.dmattn.prepass import dkv_key_order, key_expiry, query_block_lists, segment_ends
from pallas_kernels.dmattn.tuning import default_config

__all__ = ["supports", "dynamic_mask_attention_pallas", "prepare_mask"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _is_concrete(x) -> bool:
    tracer_cls = getattr(getattr(jax, "core", None), "Tracer", None)
    if tracer_cls is not None:
        return not isinstance(x, tracer_cls)
    try:  # no public Tracer class: a traced value refuses conversion
        np.asarray(x)
        return True
    except Exception:  # noqa: BLE001
        return False


def _segments_ok(query_segment_ids, key_segment_ids, b, length) -> bool:
    """Packed documents: the same segment ids for queries and keys, each document one contiguous run (checked
    when concrete; assumed when traced, which is what packing produces)."""
    if query_segment_ids is None and key_segment_ids is None:
        return True
    if query_segment_ids is None or key_segment_ids is None:
        return False
    if tuple(query_segment_ids.shape) != (b, length) or tuple(key_segment_ids.shape) != (b, length):
        return False
    if _is_concrete(query_segment_ids) and _is_concrete(key_segment_ids):
        qs, ks = np.asarray(query_segment_ids), np.asarray(key_segment_ids)
        if not np.array_equal(qs, ks):
            return False
        for row in qs:  # contiguous runs: an id never reappears after its run ended
            starts = np.concatenate([[True], row[1:] != row[:-1]])
            if len(np.unique(row[starts])) != int(starts.sum()):
                return False
        return True
    return query_segment_ids is key_segment_ids


def _positions_ok(query_positions, key_positions, length, segment_ids=None, key_mask=None) -> bool:
    """Index causality must equal position causality: positions strictly increase along the sequence over real
    tokens (within each document when segment ids are given). Concrete positions: checked. Traced positions:
    accepted only when the same array is passed for queries and keys (self-attention), and then assumed (right
    padding, HF-style left padding and per-document packing positions all satisfy it)."""
    if query_positions is None or key_positions is None:
        return False
    if _is_concrete(query_positions) and _is_concrete(key_positions):
        qp, kp = np.asarray(query_positions), np.asarray(key_positions)
        if qp.shape != kp.shape or qp.shape[-1] != length or not np.array_equal(qp, kp):
            return False
        pair = np.ones(qp[:, 1:].shape, bool)
        if key_mask is not None and _is_concrete(key_mask):
            km = np.asarray(key_mask).astype(bool)
            pair &= km[:, 1:] & km[:, :-1]
        if segment_ids is not None and _is_concrete(segment_ids):
            sg = np.asarray(segment_ids)
            pair &= sg[:, 1:] == sg[:, :-1]
        return bool(np.all(np.where(pair, qp[:, 1:] > qp[:, :-1], True)))
    return query_positions is key_positions


def supports(query, key, value, key_bias, *, keep_window_size, query_positions=None, key_positions=None,
             key_mask=None, query_segment_ids=None, key_segment_ids=None, sliding_window=None, scale=None,
             **unused) -> bool:
    """True for self-attention training/prefill calls the kernel handles; the dispatcher uses the reference
    otherwise. Accepted: query [b, L, H, D], key/value [b, L, G, D] (same L, H % G == 0), key_bias [b, G, L]
    (or [b, H, L] with H == G), D a power of two in [16, 256], dtypes f32/bf16/f16 (q, k, v alike), any L >= 1,
    key_mask [b, L] or None, positions increasing along the sequence (checked when concrete; when traced, the
    same array must be passed for queries and keys), segment ids None or the same [b, L] array for queries and
    keys with each document one contiguous run (packing), no sliding window."""
    try:
        if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape or key_bias.ndim != 3:
            return False
        b, sq, h, d = query.shape
        bk, sk, g, dk = key.shape
        if bk != b or sk != sq or dk != d or g < 1 or h % g:
            return False
        if key_bias.shape != (b, g, sk):
            return False
        if d not in (16, 32, 64, 128, 256):
            return False
        if query.dtype != key.dtype or key.dtype != value.dtype or not any(query.dtype == t for t in _DTYPES):
            return False
        if sliding_window is not None:
            return False
        if not _segments_ok(query_segment_ids, key_segment_ids, b, sk):
            return False
        if int(keep_window_size) < 1:
            return False
        if key_mask is not None and tuple(key_mask.shape) != (b, sk):
            return False
        return _positions_ok(query_positions, key_positions, sk, query_segment_ids, key_mask)
    except Exception:  # pragma: no cover - anything unexpected: let the reference handle it
        return False


def prepare_mask(key_bias, valid, keep_window_size: int, cfg: DmattnConfig, segment_ids=None,
                 num_keys: Optional[int] = None):
    """Pre-pass on the padded bias [b, G, Lp] f32, validity [b, Lp] bool and segment ids [b, Lp] int32 or None.
    Returns a dict of int arrays: e [b, G, Lp] (key j kept by rows [j, e_j)); in sparse mode also the forward and
    dq key lists, and the dk/dv key order. num_keys: the unpadded length (default Lp); w >= num_keys takes the
    fast path (no pre-pass)."""
    b, g, lp = key_bias.shape
    valid_g = jnp.broadcast_to(valid[:, None, :], (b, g, lp))
    seg_g = None if segment_ids is None else jnp.broadcast_to(segment_ids[:, None, :], (b, g, lp))
    j = jnp.arange(lp, dtype=jnp.int32)
    if keep_window_size >= (lp if num_keys is None else num_keys):
        # fast path: no row has more than L <= w keys, so none is dropped -> plain causal + key bias
        end = lp if seg_g is None else segment_ends(seg_g.reshape(b * g, lp)).reshape(b, g, lp)
        e = jnp.where(valid_g, end, j).astype(jnp.int32)
        return dict(e=e)
    bias_m = jnp.where(valid_g, key_bias, -jnp.inf).reshape(b * g, lp)
    e = key_expiry(bias_m, valid_g.reshape(b * g, lp), keep_window_size, cfg,
                   seg=None if seg_g is None else seg_g.reshape(b * g, lp))
    cap = _cap(keep_window_size)
    out = dict(e=e.reshape(b, g, lp))
    lists = {}
    for bq in sorted({cfg.block_q, cfg.block_q_dq}):
        lst, cnt = query_block_lists(e, bq, cap, cfg)
        lists[bq] = (lst.reshape(b, g, lp // bq, -1), cnt.reshape(b, g, lp // bq))
    out["lists_fwd"], out["counts_fwd"] = lists[cfg.block_q]
    out["lists_dq"], out["counts_dq"] = lists[cfg.block_q_dq]
    if cfg.dkv_group > cfg.block_k_dkv:
        out["perm"] = dkv_key_order(e, cfg.dkv_group).reshape(b, g, lp)
    return out


def _cpu_only() -> bool:
    try:
        if jax.default_backend() != "cpu":
            return False
        dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
        return dev is None or getattr(dev, "platform", "cpu") == "cpu"
    except Exception:  # pragma: no cover
        return False


def _cap(keep_window_size):
    """List capacity: without ties at most w earlier keys are kept at a block's first row."""
    return int(keep_window_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _dma_core(q, k, v, bias, aux, scale, keep_window_size, cfg):
    o, _ = flash_forward(q, k, v, bias, aux["e"], aux.get("lists_fwd"), aux.get("counts_fwd"), scale=scale,
                         cap=_cap(keep_window_size), cfg=cfg)
    return o


def _dma_fwd(q, k, v, bias, aux, scale, keep_window_size, cfg):
    o, lse = flash_forward(q, k, v, bias, aux["e"], aux.get("lists_fwd"), aux.get("counts_fwd"), scale=scale,
                           cap=_cap(keep_window_size), cfg=cfg)
    return o, (q, k, v, bias, aux, o, lse)


def _dma_bwd(scale, keep_window_size, cfg, res, do):
    q, k, v, bias, aux, o, lse = res
    dq, dk, dv, db = flash_backward(q, k, v, bias, aux["e"], o, lse, do, aux.get("lists_dq"),
                                    aux.get("counts_dq"), aux.get("perm"), scale=scale,
                                    cap=_cap(keep_window_size), cfg=cfg)
    aux_ct = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
    return dq, dk, dv, db, aux_ct


_dma_core.defvjp(_dma_fwd, _dma_bwd)


def dynamic_mask_attention_pallas(query, key, value, key_bias, *, keep_window_size, query_positions=None,
                                  key_positions=None, key_mask=None, query_segment_ids=None, key_segment_ids=None,
                                  sliding_window=None, scale=None, config: Optional[DmattnConfig] = None,
                                  interpret: Optional[bool] = None):
    """Flash dynamic-mask attention; same meaning as `reference.dynamic_mask_attention_reference` on the calls
    `supports` accepts, except that a row with no allowed key outputs zeros (reference: uniform average; such rows
    are padding queries). Ties: keys whose bias equals tau_i are all kept. O(L) memory. `config` replaces the tuned
    tiles (`tuning.default_config`). `interpret`: None = auto (interpret mode only when the default backend is the
    CPU and no GPU target is being lowered for, so that CPU runs of the model work; on a GPU never), True forces
    Pallas interpret mode (CPU tests), False forces the Triton kernels."""
    if sliding_window is not None:
        raise ValueError("dynamic_mask_attention_pallas: sliding_window is not supported")
    if (query_segment_ids is None) != (key_segment_ids is None):
        raise ValueError("dynamic_mask_attention_pallas: pass both segment ids (self-attention) or neither")
    b, length, h, d = query.shape
    scale = float(d ** -0.5 if scale is None else scale)
    w = int(keep_window_size)
    cfg = config if config is not None else default_config(d, query.dtype, dense=w >= length)
    if interpret is None:
        interpret = _cpu_only()
    if interpret and not cfg.interpret:
        cfg = DmattnConfig(**{**cfg.__dict__, "interpret": True})
    lp = round_up(length, cfg.seq_multiple)
    pad = lp - length
    valid = jnp.ones((b, length), bool) if key_mask is None else key_mask.astype(bool)
    bias = key_bias.astype(jnp.float32)
    if pad:
        padl = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        query, key, value = padl(query), padl(key), padl(value)
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    seg = None
    if key_segment_ids is not None:
        seg = key_segment_ids.astype(jnp.int32)
        if pad:
            seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    aux = prepare_mask(jax.lax.stop_gradient(bias), valid, w, cfg, seg, num_keys=length)
    out = _dma_core(query, key, value, bias, aux, scale, w, cfg)
    return out[:, :length] if pad else out
