"""Run by tests/test_train_sharding.py in a subprocess with 8 fake CPU devices.

For each variant named on the command line: the train step's gradients and metrics on 8 devices against one
device (the plain full-batch step with the reference attention), on a packed batch whose documents are longer than
keep_window_size and with A drawn non-zero, so the dynamic mask removes keys (checked, per layer). Prints one
line "RESULT <json>" with, per variant, relative errors, gradient shardings, mesh and the mask statistics.

Variants: dense (tied embeddings, GSPMD dp2 x fsdp2 x tp2), moe (CDMoE + aux loss, GSPMD), accum (GSPMD, 2
micro-batches), shard_map (the trainer's shard_map DP x FSDP mode, dp2 x fsdp4, 2 micro-batches, with the Pallas
attention kernel: attention_impl="pallas", which runs in Pallas interpret mode when the backend is the CPU,
`pallas_kernels.dmattn.ops`; the jaxpr is checked to hold a pallas_call).
"""

import json
import os
import sys
import zlib

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmask_stats import assert_mask_removes_keys  # noqa: E402
from sharded_grads import grads_on_mesh, leaf_errors, make_batch, nrel, rel  # noqa: E402
from train import sharding as shd  # noqa: E402
from wmjax.config import DogeConfig  # noqa: E402
from wmjax.models.doge import DogeForCausalLM, init_params, param_logical_axes  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()

KEEP_WINDOW = 8  # the longest document of every row of make_batch() has more tokens


def make_params(cfg):
    params = init_params(cfg, jax.random.PRNGKey(0))
    # A drawn non-zero (init is 0: every key bias exp(0) = 1, all tied, nothing removed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(zlib.crc32(str(p).encode())), x.shape)
        if getattr(p[-1], "key", "") == "A" else x, params)
    # dt_proj at a trained-model scale: softplus(dt) then varies over keys, so A's gradient (a sum of
    # softmax-gradient terms that cancels exactly when dt is constant over keys) is not a near-zero
    # cancellation residue whose relative error is ill-defined.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * 25.0 if "dt_proj" in jax.tree_util.keystr(p) else x, params)


def check(variant, batch):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, keep_window_size=KEEP_WINDOW, max_position_embeddings=64,
              tie_word_embeddings=(variant == "dense"), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if variant == "moe":
        kw.update(is_moe=True, num_experts=64, num_experts_per_tok=4, router_layout="per_token",
                  router_aux_loss_coef=0.01)
    cfg = DogeConfig(**kw)
    grad_accum = 2 if variant in ("accum", "shard_map") else 1
    params = make_params(cfg)
    mask_stats = assert_mask_removes_keys(cfg, params, batch)
    axes = param_logical_axes(cfg)

    def run(mesh, grad_accum, mode="gspmd", attention_impl="reference"):
        model = DogeForCausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl=attention_impl)
        g, m, specs, chosen, kernel = grads_on_mesh(model, cfg, params, axes, batch, mesh, grad_accum, mode,
                                                    find_kernel=True)
        assert chosen == mode, (chosen, mode)
        return g, m, specs, kernel

    devs = jax.devices()
    g1, m1, _, kernel1 = run(shd.make_mesh(1, 1, 1, devices=devs[:1]), 1)  # plain full-batch step, reference
    if variant == "shard_map":  # DP x FSDP through shard_map (per-device model, explicit collectives)
        mesh8 = shd.make_mesh(2, 4, 1, devices=devs)
        g8, m8, specs, kernel8 = run(mesh8, grad_accum, "shard_map", "pallas")
    else:
        mesh8 = shd.make_mesh(2, 2, 2, devices=devs)
        g8, m8, specs, kernel8 = run(mesh8, grad_accum)

    def loss(m):  # what the train step reports: ce + aux_coef * aux + z_loss * z
        return m["ce"] + cfg.router_aux_loss_coef * m["aux"] * cfg.is_moe + 1e-4 * m["z"]

    rels = leaf_errors(g1, g8, rel)
    return {
        "loss_rel": rel(loss(m1), loss(m8)),
        "ce_rel": rel(m1["ce"], m8["ce"]),
        "aux": [float(m1["aux"]), float(m8["aux"])],
        "grad_rel_max": max(rels.values()),
        "grad_nrel_max": max(leaf_errors(g1, g8, nrel).values()),
        "grad_rel_leaves": rels,
        "loss": float(loss(m1)),
        "specs": specs,
        "mesh": dict(mesh8.shape),
        "kernel": [kernel1, kernel8],
        "mask": mask_stats,
        "keep_window": KEEP_WINDOW,
    }


if __name__ == "__main__":
    batch = make_batch()
    print("RESULT " + json.dumps({v: check(v, batch) for v in sys.argv[1:]}), flush=True)
