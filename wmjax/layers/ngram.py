"""Low-rank n-gram embedding features (Om's `NGramEmbedding`, shared/research/om_arc.md §5.2.1).

For embeddings E [b, W, D] and window size k, window j stacks k consecutive embeddings oldest first,
U_j = [e_j ; e_{j+1} ; ... ; e_{j+k-1}] in R^{kD}, and

    F_j = W_up (W_down U_j),   ngram_down_proj: kD -> floor(D/k), ngram_up_proj: floor(D/k) -> D, no biases.

`ngram_features` adds each window's feature at its LAST token and drops the first d = max(k) - 1 positions
(look-back only):  h_t = e_t + sum_k F^(k)_{t-k+1},  t = d .. W-1  ->  [b, W - d, D]. Every module reads the raw
embeddings. A token's features read only the k - 1 tokens before it, so any window that holds those d tokens
gives the same values (a whole sequence at once, or one segment with its d look-back tokens).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from wmjax.layers.linear import dense

__all__ = ["NGramEmbedding", "ngram_features"]


class NGramEmbedding(nn.Module):
    """e [b, W, D] -> F [b, W - k + 1, D] (F_j for the window starting at j)."""

    dim: int
    k: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, e):
        rank = self.dim // self.k
        w = e.shape[1] - self.k + 1
        u = jnp.concatenate([e[:, i:i + w] for i in range(self.k)], axis=-1)          # [b, w, kD]
        down = dense(rank, ("embed", "mlp"), use_bias=False, init_std=1.0 / rank ** 0.5, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="ngram_down_proj")
        up = dense(self.dim, ("mlp", "embed"), use_bias=False, init_std=1.0 / self.dim ** 0.5, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="ngram_up_proj")
        return up(down(u))


def ngram_features(e, modules: Sequence[NGramEmbedding], sizes: Sequence[int]):
    """e [b, W, D] raw embeddings -> h [b, W - d, D], d = max(sizes) - 1: e_t plus each n-gram feature of the
    window ending at t, for t >= d."""
    d = max(sizes) - 1
    h = e[:, d:]
    for mod, k in zip(modules, sizes):
        h = h + mod(e)[:, d - k + 1:]
    return h
