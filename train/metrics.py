"""Run outputs: metrics.jsonl (+ TensorBoard when tensorboardX is installed) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import numpy as np

try:  # optional: TensorBoard event files
    from tensorboardX import SummaryWriter
except ImportError:  # pragma: no cover - depends on the environment
    SummaryWriter = None


# dense bf16 tensor-core peak per device, by jax device_kind prefix (SXM parts; the others are not listed)
PEAK_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(device) -> Optional[float]:
    """The device's dense bf16 peak FLOP/s, or None if unknown (then no MFU is reported)."""
    kind = getattr(device, "device_kind", "")
    for prefix, peak in PEAK_BF16_FLOPS.items():
        if kind.startswith(prefix):
            return peak
    return None


def model_flops_per_token(config, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (every parameter in one matmul, forward + backward) + the causal attention
    matmuls, 6 * H * head_dim * seq_len per attention layer (2 matmuls * 2 FLOPs * seq/2 keys, x3 for the
    backward). Recurrent (SSD / scan) layers count their projections only (their scans are a few % of a layer)."""
    kinds = getattr(config, "layer_types", None) or ("attention",) * config.num_hidden_layers
    n_attn = sum(1 for k in kinds if k == "attention")
    heads = getattr(config, "num_attention_heads", 0) or 0
    hd = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    return 6.0 * n_params + 6.0 * n_attn * heads * hd * seq_len


def log0(*a, **k):
    """print on process 0 only."""
    if jax.process_index() == 0:
        print(*a, **k, flush=True)


class MetricsWriter:
    def __init__(self, run_dir: str, tensorboard: bool, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        # keep only records up to the step we resume from (a killed run may have logged past its checkpoint)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as fh:
                for line in fh:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            keep.append(line)
                    except json.JSONDecodeError:
                        pass
            with open(self.path, "w") as fh:
                fh.writelines(keep if resume_step > 0 else [])
        self.fh = open(self.path, "a")
        if tensorboard and SummaryWriter is None:
            log0("[metrics] TensorBoard disabled (tensorboardX is not installed); metrics.jsonl only")
        elif tensorboard:
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, rec: dict):
        if not self.enabled:
            return
        self.fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def flush(self):
        if self.enabled:
            self.fh.flush()
            if self.tb is not None:
                self.tb.flush()

    def close(self):
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


def plot_loss(run_dir: str) -> Optional[str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    steps, losses = [], []
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            if "loss" in r:
                steps.append(r["step"])
                losses.append(r["loss"])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 20:
        k = max(5, len(losses) // 50)
        sm = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], sm, lw=1.8, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_losses(path):
    out = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                if "loss" in r:
                    out[r["step"]] = r["loss"]
    return out
