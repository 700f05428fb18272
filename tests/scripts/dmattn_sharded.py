"""Run by tests/test_dmattn_sharding.py in a subprocess with 8 fake CPU devices.

Checks that the DMA dispatcher runs the Pallas kernel per shard (jax.shard_map over the batch and kv-head mesh
axes named by the flax logical rules) and that outputs and gradients equal the unsharded reference.
Prints one line per mesh kind: "<kind> ok <max out err> <max grad err>".
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wmjax.ops.dmattn import dynamic_mask_attention  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main(kinds):
    rng = np.random.default_rng(0)
    b, L, h, g, d, w = 4, 40, 4, 2, 16, 16
    q = jnp.asarray(rng.normal(size=(b, L, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, L, g, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, L, g, d)), jnp.float32)
    kb = jnp.asarray(rng.uniform(0.1, 2, size=(b, g, L)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(L), (b, L))

    def f(q, k, v, kb, impl):
        return dynamic_mask_attention(q, k, v, kb, keep_window_size=w, query_positions=pos, key_positions=pos,
                                      implementation=impl)

    def loss(q, k, v, kb, impl):
        return (f(q, k, v, kb, impl) ** 2).sum()

    ref = f(q, k, v, kb, "reference")
    gref = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, kb, "reference")
    rules = (("activation_batch", ("data", "fsdp")), ("activation_kv_heads", "tensor"))
    for kind in kinds:
        devices = np.asarray(jax.devices()).reshape(2, 2, 2)
        if kind == "explicit":
            mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                                 axis_types=(jax.sharding.AxisType.Explicit,) * 3)
        else:
            mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            fwd = jax.jit(lambda *a: f(*a, "pallas"))
            text = fwd.lower(q, k, v, kb).as_text()
            assert "manual" in text.lower(), "the kernel was not wrapped in shard_map"
            out = fwd(q, k, v, kb)
            grads = jax.jit(jax.grad(lambda *a: loss(*a, "pallas"), argnums=(0, 1, 2, 3)))(q, k, v, kb)
        err_out = float(np.abs(np.asarray(out) - np.asarray(ref)).max())
        err_grad = max(float(np.abs(np.asarray(a) - np.asarray(r)).max() / (np.abs(np.asarray(r)).max() + 1e-30))
                       for a, r in zip(grads, gref))
        print(kind, "ok", err_out, err_grad, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["auto", "explicit"])
