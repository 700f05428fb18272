"""The "logn" length scaling of OTCE (upstream `CheemsMambaMixer` on C, `CheemsFlashAttention2` on queries):

    scale(position) = max(1, ln(65 + position) / ln(4096))

It is 1 for positions up to 4030 and grows slowly past the 4096-token training context (ln 4096 / ln(65 + i)
style entropy-invariant scaling; docs/OTCE.md, logn).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = ["logn_scale"]


def logn_scale(positions):
    """positions [...] int -> [...] f32: max(1, ln(65 + position) / ln(4096))."""
    return jnp.maximum(1.0, jnp.log(65.0 + positions.astype(jnp.float32)) / math.log(4096.0))
