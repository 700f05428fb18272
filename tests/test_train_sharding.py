"""Sharded train step == single-device step (f32, <= 1e-5 rel) on 8 fake CPU devices, with the dynamic mask live.

The comparison runs in a subprocess (tests/scripts/train_sharded_step.py) started with
XLA_FLAGS=--xla_force_host_platform_device_count=8, so it does not clash with the device count of the other test
modules in this pytest process. Its batch packs documents longer than keep_window_size and its A is drawn
non-zero; the worker asserts, per layer, that the top-k removed keys (tests/scripts/dmask_stats.py). Variants:
dense / moe / accum through GSPMD (dp2 x fsdp2 x tp2), shard_map (the trainer's shard_map DP x FSDP mode with the
Pallas attention kernel in interpret mode, dp2 x fsdp4) against one device with the reference attention.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "scripts", "train_sharded_step.py")

VARIANTS = ["dense", "moe", "accum", "shard_map"]


@pytest.fixture(scope="module")
def results():
    return _run_worker(*VARIANTS)


def _run_worker(*variants):
    env = dict(os.environ)
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, WORKER, *variants], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sharded_step_matches_single_device(results, variant):
    r = results[variant]
    # the top-k fired: every layer has rows with more allowed keys than keep_window_size, and fewer kept
    for layer in r["mask"]:
        assert layer["max_allowed"] > r["keep_window"] and layer["rows_trimmed"] > 0, r["mask"]
    if variant == "shard_map":
        assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
        assert any("fsdp" in s for s in r["specs"]), r["specs"]
        assert r["kernel"] == [False, True], r["kernel"]  # 8 devices: the Pallas kernel; 1 device: the reference
    else:
        assert r["kernel"] == [False, False], r["kernel"]
        assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
        # the gradients (laid out like the params) really are sharded over fsdp and tensor
        assert any("fsdp" in s for s in r["specs"]) and any("tensor" in s for s in r["specs"]), r["specs"]
    assert r["loss_rel"] <= 1e-5, r
    assert r["ce_rel"] <= 1e-5, r
    assert r["grad_rel_max"] <= 1e-5, r
    assert r["grad_nrel_max"] <= 1e-5, r
    print(variant, {k: v for k, v in r.items() if k != "grad_rel_leaves"})
    if variant == "moe":
        assert r["aux"][0] > 0 and abs(r["aux"][0] - r["aux"][1]) <= 1e-5 * abs(r["aux"][0]), r
