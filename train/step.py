"""The train step: gradients (GSPMD or shard_map data/FSDP parallelism, gradient accumulation), the optimizer
update, and the step's metrics (with a per-parameter non-finite flag for the NaN guard)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from wmjax.config import ConfigError

from .sharding import path_str


def make_grad_fn(loss_fn, grad_accum: int, mesh=None, denom_axes=None):
    """(params, batch) -> (grads, metrics), accumulating over ``grad_accum`` micro-batches with lax.scan.

    The loss is normalised by the token count of the *whole* batch, so the accumulated gradient equals the
    full-batch gradient (up to summation order).
    """
    vg = jax.value_and_grad(loss_fn, has_aux=True)

    def grad_fn(params, batch):
        denom = jnp.sum(batch["loss_mask"])
        if denom_axes:  # inside shard_map: normalise by the token count of the global batch
            denom = jax.lax.psum(denom, denom_axes)
        denom = jnp.maximum(denom, 1.0)
        if grad_accum == 1:
            (loss, aux), grads = vg(params, batch, denom)
            ce, auxl, z = aux["ce_sum"], aux["aux"], aux["z_sum"]
        else:
            def split(x):
                b = x.shape[0]
                y = x.reshape(b // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                if mesh is not None:
                    y = jax.lax.with_sharding_constraint(
                        y, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 1)))))
                return y

            mbs = jax.tree_util.tree_map(split, batch)

            def body(carry, mb):
                g_acc, ce_acc, aux_acc, z_acc = carry
                (l, aux), g = vg(params, mb, denom, 1.0 / grad_accum)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                return (g_acc, ce_acc + aux["ce_sum"], aux_acc + aux["aux"], z_acc + aux["z_sum"]), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
            z0 = jnp.zeros((), jnp.float32)
            (grads, ce, auxl, z), _ = jax.lax.scan(body, (zeros, z0, z0, z0), mbs)
            auxl = auxl / grad_accum  # the aux loss is the mean over micro-batches (its gradient too)
        ce_mean = ce / denom
        return grads, {"ce": ce_mean, "aux": auxl, "z": z / denom, "tokens": denom}

    return grad_fn


BATCH_AXES = ("data", "fsdp")


def make_shard_map_grad_fn(loss_fn, grad_accum: int, mesh, param_specs):
    """Data parallel / FSDP with ``jax.shard_map``: every device runs the model on its own rows only.

    GSPMD cannot partition custom calls that carry no sharding rule (the Pallas/Triton attention kernel is
    one): it all-gathers their operands and every device computes them for the whole batch.  Here the model
    runs per device on local arrays: params sharded over ``fsdp`` are all-gathered in, gradients are summed over
    ``data`` and reduce-scattered back over ``fsdp`` (ZeRO-3), and the loss is normalised by the global token
    count, so the result equals the global-batch gradient up to summation order.  Needs ``mesh.tensor == 1``.
    """

    inner = make_grad_fn(loss_fn, grad_accum, mesh=None, denom_axes=BATCH_AXES)

    def fsdp_dim(spec):
        for d, a in enumerate(spec):
            if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a):
                return d
        return None

    dims = jax.tree_util.tree_map(fsdp_dim, param_specs, is_leaf=lambda x: isinstance(x, P))

    def local(params, batch):
        full = jax.tree_util.tree_map(
            lambda x, d: x if d is None else jax.lax.all_gather(x, "fsdp", axis=d, tiled=True), params, dims)
        with nn.logical_axis_rules(()):  # no sharding constraints on local arrays
            grads, m = inner(full, batch)

        def reduce(g, d):
            if d is None:
                return jax.lax.psum(g, BATCH_AXES)
            return jax.lax.psum_scatter(jax.lax.psum(g, "data"), "fsdp", scatter_dimension=d, tiled=True)

        grads = jax.tree_util.tree_map(reduce, grads, dims)
        m = {"ce": jax.lax.psum(m["ce"], BATCH_AXES), "z": jax.lax.psum(m["z"], BATCH_AXES),
             "aux": jax.lax.pmean(m["aux"], BATCH_AXES), "tokens": m["tokens"]}
        return grads, m

    bspec = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, bspec), out_specs=(param_specs, P()),
                         check_vma=False)


def choose_spmd(mode: str, mesh, model_cfg) -> str:
    """'shard_map' for pure DP/FSDP of dense models on several devices (auto), else 'gspmd'.

    MoE stays on GSPMD: its aux loss is a nonlinear function of whole-batch router statistics and the HF
    router layout mixes tokens across batch rows, so per-device computation would change the math.
    """
    if mode == "auto":
        ok = mesh.shape["tensor"] == 1 and mesh.size > 1 and not getattr(model_cfg, "is_moe", False)
        return "shard_map" if ok else "gspmd"
    if mode == "shard_map":
        if mesh.shape["tensor"] != 1:
            raise ConfigError("train.spmd=shard_map needs mesh.tensor == 1 (use gspmd for tensor parallelism)")
        if getattr(model_cfg, "is_moe", False):
            raise ConfigError("train.spmd=shard_map is for dense models (MoE aux loss / HF router layout are "
                              "whole-batch); use gspmd")
    return mode


def build_grad_fn(loss_fn, grad_accum: int, mesh, param_sh, model_cfg, mode: str = "auto"):
    """-> (grad_fn, chosen mode)."""
    chosen = choose_spmd(mode, mesh, model_cfg)
    if chosen == "shard_map":
        specs = jax.tree_util.tree_map(lambda s: s.spec, param_sh)
        return make_shard_map_grad_fn(loss_fn, grad_accum, mesh, specs), chosen
    return make_grad_fn(loss_fn, grad_accum, mesh), chosen


NONFINITE = "nonfinite_grads"  # metrics key: [num param leaves] bool, a leaf's gradient has a non-finite norm


def nonfinite_param_names(params, flags, limit: int = 4) -> str:
    """'N of M parameters: a/b/kernel, ...' for the leaves whose flag is set, in forward order (layer index)."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    bad = [n for n, f in zip(paths, np.asarray(flags)) if f]

    def order(name):  # embedding, layers_0 .. layers_{L-1}, then the final norm / head
        parts = name.split("/")
        if "embed_tokens" in parts:
            return (-1, name)
        layer = next((int(q[7:]) for q in parts if q.startswith("layers_") and q[7:].isdigit()), 1 << 30)
        return (layer, name)

    bad.sort(key=order)
    more = f", ... (+{len(bad) - limit})" if len(bad) > limit else ""
    return f"{len(bad)} of {len(paths)} parameters, first {', '.join(bad[:limit])}{more}"


def make_train_step(grad_fn, tx, sched, model_cfg, z_loss: float):
    is_moe = bool(getattr(model_cfg, "is_moe", False))
    aux_coef = float(getattr(model_cfg, "router_aux_loss_coef", 0.0)) if is_moe else 0.0

    def train_step(state, batch):
        grads, m = grad_fn(state["params"], batch)
        with jax.named_scope("optimizer"):
            leaf_sq = [jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(grads)]
            gnorm = jnp.sqrt(sum(leaf_sq))  # = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
        loss = m["ce"] + aux_coef * m["aux"] + (z_loss * m["z"] if z_loss else 0.0)
        metrics = {"loss": loss, "ce": m["ce"], "aux": m["aux"], "grad_norm": gnorm, "lr": sched(state["step"]),
                   "tokens": m["tokens"], NONFINITE: ~jnp.isfinite(jnp.stack(leaf_sq))}
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    return train_step
