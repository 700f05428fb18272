"""Run by tests/test_families.py in a subprocess with 8 fake CPU devices.

For each model family named on the command line (its configs/<family>-tiny.yaml model, vocab 256): the train
step's gradients and metrics through GSPMD on a data 2 x fsdp 2 x tensor 2 mesh against one device, on a packed
batch (segment ids and restarting positions when the model takes them). Prints one line "RESULT <json>" with,
per family, relative errors, the gradient shardings and the mesh.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sharded_grads import grads_on_mesh, leaf_errors, make_batch, nrel, rel  # noqa: E402
from train import sharding as shd  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import build_model_config, model_accepts  # noqa: E402
from wmjax.models.registry import family_of  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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

    model = family.model_cls(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
    devs = jax.devices()
    g1, m1, *_ = grads_on_mesh(model, cfg, params, axes, batch, shd.make_mesh(1, 1, 1, devices=devs[:1]),
                               use_segments=use_seg)
    mesh8 = shd.make_mesh(2, 2, 2, devices=devs)
    g8, m8, specs, *_ = grads_on_mesh(model, cfg, params, axes, batch, mesh8, use_segments=use_seg)
    nrels = leaf_errors(g1, g8, nrel)
    leaves8 = jax.tree_util.tree_leaves(g8)
    return {"ce_rel": rel(m1["ce"], m8["ce"]), "aux": [float(m1["aux"]), float(m8["aux"])],
            "aux_rel": rel(m1["aux"], m8["aux"]) if float(m1["aux"]) else 0.0,
            "grad_rel_max": max(leaf_errors(g1, g8, rel).values()),
            "grad_nrel_max": max(nrels.values()),
            "grad_nrel_leaves": nrels,
            "worst": max(nrels.items(), key=lambda t: t[1]),
            "ce": float(m1["ce"]), "specs": specs, "mesh": dict(mesh8.shape), "segments": use_seg,
            "n_leaves": len(leaves8), "grad_norm": float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                                                                      for x in leaves8)))}


if __name__ == "__main__":
    batch = make_batch()
    print("RESULT " + json.dumps({f: check(f, batch) for f in sys.argv[1:]}), flush=True)
