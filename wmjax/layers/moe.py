"""CDMoE: Cross-Domain Mixture of Experts (HF `DogeCDMoE`; docs/DOGE.md, CDMoE).

    out = down(silu(gate(x)) * up(x))                                   (dense shared MLP)
        + sum_{t<k} silu(down_embed[e_t] . x) * w_t * up_embed[e_t]     (k of num_experts single-neuron experts)

Product-key routing: router_gate(x) gives 2K logits (K = sqrt(num_experts)) split into x-keys Lx and y-keys Ly;
expert (i, j) = i*K + j scores Lx[i] + Ly[j]; the top k of the K^2 sums are taken (exactly: only the top-k of Lx
and of Ly can contribute, so k^2 candidates suffice), w = softmax over the k selected scores.

`router_layout="hf"` reproduces transformers' `router_logits.view(2, N, K)` over the flattened batch: slot m reads
its x-keys from token m//2 and its y-keys from token (N+m)//2 (docs/DOGE.md, CDMoE router layout; all published
MoE checkpoints).
`router_layout="per_token"` is the intended split: token m's own logits are [x-keys | y-keys].
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.config import DogeConfig
from wmjax.layers.linear import dense


def split_router_logits(router_logits, layout: str):
    """router_logits [N, 2K] -> (Lx, Ly) each [N, K] under `layout` ("hf" | "per_token")."""
    n, two_k = router_logits.shape
    k = two_k // 2
    if layout == "hf":
        r = router_logits.reshape(2, n, k)
        return r[0], r[1]
    r = router_logits.reshape(n, 2, k)
    return r[:, 0], r[:, 1]


def route(logits_x, logits_y, top_k: int):
    """Exact product-key top-k. logits [N, K] -> (scores [N, top_k], expert ids [N, top_k] = i*K + j)."""
    num_keys = logits_x.shape[-1]
    c = min(top_k, num_keys)
    sx, ix = jax.lax.top_k(logits_x, c)
    sy, iy = jax.lax.top_k(logits_y, c)
    cand = (sx[:, :, None] + sy[:, None, :]).reshape(sx.shape[0], c * c)
    ids = (ix[:, :, None] * num_keys + iy[:, None, :]).reshape(sx.shape[0], c * c)
    scores, pos = jax.lax.top_k(cand, top_k)
    return scores, jnp.take_along_axis(ids, pos, axis=-1)


def router_aux_statistics(logits_x, logits_y, expert_ids, token_mask):
    """Per-layer pieces of HF's load-balancing loss (docs/DOGE.md, CDMoE).

    Returns (expert_counts [E], prob_sums [E], num_tokens): counts of selected (token, slot) assignments,
    the sum over tokens of softmax over all K^2 candidate scores (indexed by expert id), and the token count;
    padding tokens (token_mask == 0) are excluded.
    """
    n, k = logits_x.shape
    num_experts = k * k
    w = token_mask.astype(jnp.float32)
    counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(
        jnp.repeat(w, expert_ids.shape[-1]))
    probs = jax.nn.softmax((logits_x[:, :, None] + logits_y[:, None, :]).reshape(n, num_experts).astype(jnp.float32),
                           axis=-1)
    return counts, jnp.einsum("n,ne->e", w, probs), jnp.sum(w)


def router_aux_loss(stats, num_experts: int, top_k: int):
    """HF `load_balancing_loss_func` from the per-layer statistics: E * sum_e f_e * P_e."""
    counts = sum(s[0] for s in stats)
    prob_sums = sum(s[1] for s in stats)
    tokens = sum(s[2] for s in stats)
    f = counts / (tokens * top_k)
    p = prob_sums / tokens
    return num_experts * jnp.sum(f * p)


class CDMoE(nn.Module):
    config: DogeConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, token_mask: Optional[jax.Array] = None, compute_aux: bool = False):
        """x [b, s, hidden] -> (out [b, s, hidden], aux statistics or None).

        With compute_aux, returns `router_aux_statistics` and sows the (2, N, K) router logits (as HF returns them)
        into "intermediates"."""
        cfg = self.config
        b, s, d = x.shape
        n = b * s
        mk = lambda feats, axes, name, bias: dense(feats, axes, use_bias=bias, init_std=cfg.initializer_range,
                                                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        gate = mk(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", cfg.mlp_bias)(x)
        up = mk(cfg.intermediate_size, ("embed", "mlp"), "up_proj", cfg.mlp_bias)(x)
        dense_out = mk(cfg.hidden_size, ("mlp", "embed"), "down_proj", cfg.mlp_bias)(jax.nn.silu(gate) * up)

        logits = mk(2 * cfg.num_keys, ("embed", "expert_keys"), "router_gate", False)(x).reshape(n, 2 * cfg.num_keys)
        lx, ly = split_router_logits(logits.astype(jnp.float32), cfg.router_layout)
        scores, experts = route(lx, ly, cfg.num_experts_per_tok)
        weights = jax.nn.softmax(scores, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

        emb_init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("experts", "embed"))
        down_embed = self.param("down_embed", emb_init, (cfg.num_experts, d), self.param_dtype)
        up_embed = self.param("up_embed", emb_init, (cfg.num_experts, d), self.param_dtype)
        xf = x.reshape(n, d)
        dw = jnp.take(down_embed, experts, axis=0).astype(self.dtype)  # [N, k, d]
        uw = jnp.take(up_embed, experts, axis=0).astype(self.dtype)
        act = jax.nn.silu(jnp.einsum("nkd,nd->nk", dw, xf)) * weights.astype(self.dtype)
        routed = jnp.einsum("nk,nkd->nd", act, uw).reshape(b, s, d)
        stats = None
        if compute_aux:
            mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.reshape(n)
            stats = router_aux_statistics(lx, ly, experts, mask)
            self.sow("intermediates", "router_logits", jnp.stack([lx, ly]))
        return dense_out + routed, stats
