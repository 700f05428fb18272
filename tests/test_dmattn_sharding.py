"""The DMA dispatcher runs the Pallas kernel per shard under a mesh (8 fake CPU devices, interpret mode)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "dmattn_sharded.py")


def test_kernel_runs_per_shard_and_matches_reference():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # the checkout, installed or not
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split() for ln in proc.stdout.splitlines() if " ok " in ln]
    assert [ln[0] for ln in lines] == ["auto", "explicit"], proc.stdout
    for kind, _, err_out, err_grad in lines:
        # f32 on both paths; the kernel accumulates in a different order than the reference
        assert float(err_out) < 1e-4, (kind, err_out)
        assert float(err_grad) < 1e-4, (kind, err_grad)
