"""The training loss: next-token cross-entropy over the packed batch (+ z-loss, + MoE load-balancing loss)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wmjax.config import ConfigError
from wmjax.ops.cross_entropy import lm_head_cross_entropy

from .model import model_accepts


def _sum_sown(tree, name: str):
    total, found = 0.0, False
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(getattr(k, "key", None) == name for k in path):
            total = total + jnp.asarray(leaf, jnp.float32)
            found = True
    return total if found else None


LOSS_IMPLS = ("auto", "fused", "logits")


def choose_loss_impl(impl: str, model) -> str:
    """'fused' (wmjax.ops.cross_entropy: LM head + loss in sequence chunks, no [b, s, vocab] f32 logits) when
    the model can return its final hidden states, else 'logits' (the model's logits, then an f32 log-softmax)."""
    if impl not in LOSS_IMPLS:
        raise ConfigError(f"train.loss_impl: expected {'|'.join(LOSS_IMPLS)}, got {impl!r}")
    can = model_accepts(type(model), "return_hidden") and hasattr(type(model), "lm_head_weight")
    if impl == "fused" and not can:
        raise ConfigError("train.loss_impl=fused needs a model with return_hidden / lm_head_weight")
    if impl == "auto":
        return "fused" if can else "logits"
    return impl


def make_loss_fn(model, model_cfg, z_loss: float = 0.0, use_segments: bool = True, loss_impl: str = "auto",
                 chunk_tokens: int = 8192):
    """(params, micro-batch, denom, aux_weight) -> (loss, {ce_sum, aux, z_sum}).

    loss = sum(mask * CE) / denom (+ z_loss * sum(mask * lse^2) / denom) (+ MoE aux). Both loss paths compute
    the same function: compute-dtype logits (the model's), f32 log-softmax; ``fused`` never materialises them
    for the whole batch (see wmjax.ops.cross_entropy).
    """

    is_moe = bool(getattr(model_cfg, "is_moe", False))
    aux_coef = float(getattr(model_cfg, "router_aux_loss_coef", 0.0)) if is_moe else 0.0
    impl = choose_loss_impl(loss_impl, model)
    fused = impl == "fused"

    def loss_fn(params, mb, denom, aux_weight=1.0):
        kwargs = {}
        if use_segments:
            kwargs["segment_ids"] = mb["segment_ids"]
            kwargs["positions"] = mb["positions"]
        if fused:
            kwargs["return_hidden"] = True
        if is_moe:
            kwargs["output_router_logits"] = True
            out, state = model.apply({"params": params}, mb["tokens"], mutable=["intermediates"], **kwargs)
            aux = _sum_sown(state.get("intermediates", {}), "router_aux_loss")
            aux = jnp.zeros((), jnp.float32) if aux is None else aux
        else:
            out = model.apply({"params": params}, mb["tokens"], **kwargs)
            aux = jnp.zeros((), jnp.float32)
        out = out[0] if isinstance(out, (tuple, list)) else out
        mask = mb["loss_mask"]
        with jax.named_scope("loss"):
            if fused:
                w, layout = type(model).lm_head_weight(model_cfg, params)
                obj, ce_sum, z_sum = lm_head_cross_entropy(out, w, mb["targets"], mask, z_coef=float(z_loss),
                                                           chunk_tokens=chunk_tokens, layout=layout)
                loss = obj / denom + aux_weight * aux_coef * aux
            else:
                logits = out.astype(jnp.float32)
                lse = jax.nn.logsumexp(logits, axis=-1)
                tgt = jnp.take_along_axis(logits, mb["targets"][..., None], axis=-1)[..., 0]
                ce_sum = jnp.sum((lse - tgt) * mask)
                z_sum = jnp.sum(jnp.square(lse) * mask)
                loss = ce_sum / denom + aux_weight * aux_coef * aux
                if z_loss:
                    loss = loss + z_loss * z_sum / denom
        return loss, {"ce_sum": ce_sum, "aux": aux, "z_sum": z_sum}

    loss_fn.impl = impl
    return loss_fn
