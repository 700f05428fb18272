"""What the PyTorch references share: upstream's `_init_weights` and RoPE's `rotate_half`."""

from __future__ import annotations

import torch
from torch import nn


def init_weights_(model: nn.Module, std: float) -> nn.Module:
    """Upstream `_init_weights`, in place: every Linear / Conv1d / Embedding weight N(0, std), biases 0, an
    Embedding's padding_idx row 0."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
    return model


def rotate_half(x):
    """[x1 | x2] (halves of the last axis) -> [-x2 | x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
