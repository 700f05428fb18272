"""Product-key CDMoE, the WonderfulMatrices variant (`CheemsCDMoE`, WM `DogeCDMoE`;
/work/shared/research/ssd_cheems_otce.md 1.7). It lives beside HF's router-gate CDMoE (`wmjax.layers.moe.CDMoE`):
the retrieval here has per-head queries and learned keys instead of one router Linear.

    dense = down(silu(gate(u)) * up(u))                                      (the gated MLP, always present)
    q     = queries(u).view(b, t, 2, heads, R/2)                            (halves p = 0, 1)
    sim_p[h, j] = q[p, h] . keys[h, j, p]                                   j < K = int(sqrt(E))
    (s, ids) = exact product-key top-k per head (`wmjax.layers.moe.route`: top-k of each half, k^2 candidates
               sx_i + sy_j with id i*K + j, top-k of those)                  k = num_cdmoe_experts_per_head
    w = silu(u . down_embed[ids]) * softmax_k(s)                            (softmax within each head)
    out = dense + sum_{h, k} w * up_embed[ids]

Params (upstream names): gate_proj, up_proj [d, I], down_proj [I, d] (bias iff hidden_bias), queries
[d, heads*R] (no bias), keys [heads, K, 2, R/2] (init zeros: at init every score ties), down_embed, up_embed [E, d].
No router loss (upstream returns none).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.layers.linear import dense, fused_dense
from wmjax.layers.moe import route

__all__ = ["ProductKeyCDMoE", "product_key_route"]


def product_key_route(q, keys, top_k: int):
    """q [N, 2, heads, R/2], keys [heads, K, 2, R/2] -> (scores [N, heads, top_k] f32, ids [N, heads, top_k]).

    Per head, the similarity of each half of the query with that half's K keys (f32), then the exact product-key
    top-k (`route`)."""
    n, _, heads, _ = q.shape
    num_keys = keys.shape[1]
    sim = jnp.einsum("nphr,hkpr->pnhk", q.astype(jnp.float32), keys.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)                      # [2, N, heads, K]
    scores, ids = route(sim[0].reshape(n * heads, num_keys), sim[1].reshape(n * heads, num_keys), top_k)
    return scores.reshape(n, heads, top_k), ids.reshape(n, heads, top_k)


class ProductKeyCDMoE(nn.Module):
    """x [b, s, d] -> out [b, s, d]. Reads from `config`: hidden_size, intermediate_size, hidden_bias,
    initializer_range, num_cdmoe_experts, num_cdmoe_heads, num_cdmoe_experts_per_head, expert_retrieval_size,
    num_keys."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, s, d = x.shape
        n = b * s
        heads, r, k = cfg.num_cdmoe_heads, cfg.expert_retrieval_size, cfg.num_cdmoe_experts_per_head
        mk = dict(init_std=cfg.initializer_range, dtype=self.dtype, param_dtype=self.param_dtype)
        gate, up = fused_dense(x, [(cfg.intermediate_size, ("embed", "mlp"), "gate_proj"),
                                   (cfg.intermediate_size, ("embed", "mlp"), "up_proj")],
                               use_bias=cfg.hidden_bias, **mk)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                            ("activation_batch", "activation_length", "activation_mlp"))
        dense_out = dense(d, ("mlp", "embed"), use_bias=cfg.hidden_bias, name="down_proj", **mk)(hidden)

        q = dense(heads * r, ("embed", "expert_keys"), use_bias=False, name="queries", **mk)(x)
        keys = self.param("keys", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("expert_heads", "keys", None, "expert_keys")),
                          (heads, cfg.num_keys, 2, r // 2), self.param_dtype)
        scores, ids = product_key_route(q.reshape(n, 2, heads, r // 2), keys, k)
        weights = jax.nn.softmax(scores, axis=-1).reshape(n, heads * k)
        ids = ids.reshape(n, heads * k)

        emb_init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("experts", "embed"))
        down_embed = self.param("down_embed", emb_init, (cfg.num_cdmoe_experts, d), self.param_dtype)
        up_embed = self.param("up_embed", emb_init, (cfg.num_cdmoe_experts, d), self.param_dtype)
        xf = x.reshape(n, d).astype(self.dtype)
        dw = jnp.take(down_embed, ids, axis=0).astype(self.dtype)  # [N, heads*k, d]
        uw = jnp.take(up_embed, ids, axis=0).astype(self.dtype)
        act = jax.nn.silu(jnp.einsum("nkd,nd->nk", dw, xf)) * weights.astype(self.dtype)
        routed = jnp.einsum("nk,nkd->nd", act, uw).reshape(b, s, d)
        return dense_out + routed
