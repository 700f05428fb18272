"""What the sharded train-step workers share (family_sharded_step.py, train_sharded_step.py; run with 8 fake CPU
devices, XLA_FLAGS set before this is imported): the packed batch, the train step's gradients on a mesh, and the
relative errors between two runs."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from train import sharding as shd
from train.data import pack
from train.loss import make_loss_fn
from train.step import build_grad_fn

B, L = 16, 32


def make_batch():
    """B = 16 rows of L = 32 tokens in [4, 256), each row three packed documents (bos 2, eos 3; boundaries at
    random columns in [5, 30)): train.data.pack's dict."""
    rng = np.random.default_rng(0)
    win = rng.integers(4, 256, size=(B, L + 1)).astype(np.int32)
    win[:, 0] = 2
    for r in range(B):
        for c in rng.choice(np.arange(5, L - 2), size=2, replace=False):
            win[r, c], win[r, c + 1] = 3, 2
    return pack(win, eos_id=3, bos_id=2)


def grads_on_mesh(model, cfg, params, axes, batch, mesh, grad_accum=1, mode="gspmd", use_segments=True,
                  find_kernel=False):
    """The train step (z_loss 1e-4) on `mesh`, params and batch placed by train.sharding -> (gradients, metrics,
    the gradients' sorted PartitionSpecs, the mode build_grad_fn chose, whether the step's jaxpr holds a
    pallas_call (None unless find_kernel))."""
    psh = shd.param_shardings(axes, params, mesh, warn=None)
    bsh = shd.batch_sharding(mesh)
    loss_fn = make_loss_fn(model, cfg, z_loss=1e-4, use_segments=use_segments)
    grad_fn, chosen = build_grad_fn(loss_fn, grad_accum, mesh, psh, cfg, mode)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.flax_rules()):
        p = jax.device_put(params, psh)
        b = {k: jax.device_put(v, bsh) for k, v in batch.items()}
        fn = jax.jit(grad_fn, in_shardings=(psh, {k: bsh for k in b}), out_shardings=(psh, None))
        kernel = "pallas_call" in str(jax.make_jaxpr(fn)(p, b)) if find_kernel else None
        g, m = fn(p, b)
        specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(g)})
        return jax.device_get(g), jax.device_get(m), specs, chosen, kernel


def rel(a, b):
    """max |a - b| / max |a| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def nrel(a, b):
    """||a - b|| / ||a|| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def leaf_errors(g1, g2, err):
    """{leaf path: err(leaf of g1, leaf of g2)} over two gradient trees of one structure."""
    leaves1 = jax.tree_util.tree_flatten_with_path(g1)[0]
    return {jax.tree_util.keystr(k): err(a, b) for (k, a), b in zip(leaves1, jax.tree_util.tree_leaves(g2))}
