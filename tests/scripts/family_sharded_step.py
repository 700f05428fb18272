"""Run by tests/test_families.py in a subprocess with 8 fake CPU devices.

For each model family named on the command line (its configs/<family>-tiny.yaml model, vocab 256): the train
step's gradients and metrics through GSPMD on a data 2 x fsdp 2 x tensor 2 mesh against one device, on a packed
batch (segment ids and restarting positions when the model takes them). Prints one line "RESULT <json>" with,
per family, relative errors, the gradient shardings and the mesh.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from train import sharding as shd  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import pack  # noqa: E402
from train.loss import make_loss_fn  # noqa: E402
from train.model import build_model_config, model_accepts  # noqa: E402
from train.step import build_grad_fn  # noqa: E402
from wmjax.models.registry import family_of  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, L = 16, 32


def make_batch():
    """16 rows of 32 tokens, each row three packed documents (boundaries at random columns in [5, 30))."""
    rng = np.random.default_rng(0)
    win = rng.integers(4, 256, size=(B, L + 1)).astype(np.int32)
    win[:, 0] = 2
    for r in range(B):
        for c in rng.choice(np.arange(5, L - 2), size=2, replace=False):
            win[r, c], win[r, c + 1] = 3, 2
    return pack(win, eos_id=3, bos_id=2)


def check(name, batch):
    section = dict(load_config(os.path.join(ROOT, "configs", f"{name}-tiny.yaml")).model)
    section["vocab_size"] = 256
    cfg = build_model_config(section, 256, {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0})
    family = family_of(cfg)
    assert family.name == name, (family.name, name)
    params = family.init_params(cfg, jax.random.PRNGKey(0))
    # non-trivial values everywhere (zero-initialised params have zero gradients for some paths)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                                    for x, k in zip(leaves, keys)])
    axes = family.param_logical_axes(cfg)
    use_seg = model_accepts(family.model_cls, "segment_ids") and getattr(family.model_cls, "accepts_segment_ids",
                                                                         True)

    def run(mesh):
        model = family.model_cls(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
        psh = shd.param_shardings(axes, params, mesh, warn=None)
        bsh = shd.batch_sharding(mesh)
        loss_fn = make_loss_fn(model, cfg, z_loss=1e-4, use_segments=use_seg)
        grad_fn, chosen = build_grad_fn(loss_fn, 1, mesh, psh, cfg, "gspmd")
        with jax.set_mesh(mesh), nn.logical_axis_rules(shd.flax_rules()):
            p = jax.device_put(params, psh)
            b = {k: jax.device_put(v, bsh) for k, v in batch.items()}
            fn = jax.jit(grad_fn, in_shardings=(psh, {k: bsh for k in b}), out_shardings=(psh, None))
            g, m = fn(p, b)
            specs = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(g)})
            return jax.device_get(g), jax.device_get(m), specs

    devs = jax.devices()
    g1, m1, _ = run(shd.make_mesh(1, 1, 1, devices=devs[:1]))
    mesh8 = shd.make_mesh(2, 2, 2, devices=devs)
    g8, m8, specs = run(mesh8)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))

    def nrel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))

    leaves1 = jax.tree_util.tree_flatten_with_path(g1)[0]
    leaves8 = jax.tree_util.tree_leaves(g8)
    return {"ce_rel": rel(m1["ce"], m8["ce"]), "aux": [float(m1["aux"]), float(m8["aux"])],
            "aux_rel": rel(m1["aux"], m8["aux"]) if float(m1["aux"]) else 0.0,
            "grad_rel_max": max(rel(a, b) for (_, a), b in zip(leaves1, leaves8)),
            "grad_nrel_max": max(nrel(a, b) for (_, a), b in zip(leaves1, leaves8)),
            "grad_nrel_leaves": {jax.tree_util.keystr(k): nrel(a, b) for (k, a), b in zip(leaves1, leaves8)},
            "worst": max(((jax.tree_util.keystr(k), nrel(a, b)) for (k, a), b in zip(leaves1, leaves8)),
                         key=lambda t: t[1]),
            "ce": float(m1["ce"]), "specs": specs, "mesh": dict(mesh8.shape), "segments": use_seg,
            "n_leaves": len(leaves8), "grad_norm": float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                                                      for x in leaves8)))}


if __name__ == "__main__":
    batch = make_batch()
    print("RESULT " + json.dumps({f: check(f, batch) for f in sys.argv[1:]}), flush=True)
