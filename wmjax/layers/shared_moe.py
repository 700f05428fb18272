"""OTCE's gated-tanh MLP and "cross-domain" shared-parameter mixture of experts (upstream `CheemsMLP`,
`CheemsSharedMoeLayer`; /work/shared/research/ssd_cheems_otce.md §2.7; docs/OTCE.md, MoE).

    MLP_I(u) = down(tanh(up(u)) * silu(gate(u)))                     gate/up d -> I, down I -> d

    p = softmax(router(u)) (f32, over the E_n experts); top-k of p, NOT renormalised, cast to u's dtype
    out = sum_{selected e} p_e * expert_e(u)

    expert_type   layer-level shared params          expert_e(u)
    "expansive"   shared_{gate,up,down}_proj (I)      s = MLP_shared(u); s = sigmoid(shared_expert_gate_e(s)) * s;
                                                      MLP_private_e(s)                (private size I/2)
    "cohesive"    shared_up_proj (d -> I/2)           down_e(tanh(shared_up(u)) * silu(gate_e(u)))
    None          -                                   MLP_e(u)                        (size I)

Every expert is evaluated on every token and weighted by its (zero when unselected) routing weight: the same sum
as upstream's per-expert dispatch, with the E_n (default 4) private parts batched into one einsum.

Load-balancing statistics (`router_aux_statistics`): the Switch / Mixtral loss over the router logits of every
MoE layer, E_n * sum_e (selections_e / tokens) * mean_e(p), padding excluded (upstream's intended masked
branch); `wmjax.layers.moe.router_aux_loss(stats, E_n, 1)` turns the summed statistics into the loss (top_k = 1
there because Mixtral's loss sums the k selection slots' fractions instead of averaging them).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmjax.configs.otce import OTCEConfig
from wmjax.layers.linear import DenseParams, dense, fused_dense

__all__ = ["TanhGatedMLP", "SharedMoE", "router_aux_statistics"]

_HP = jax.lax.Precision.HIGHEST


class TanhGatedMLP(nn.Module):
    """x [..., d] -> down(tanh(up(x)) * silu(gate(x))) [..., d]; params gate_proj, up_proj, down_proj."""

    hidden_size: int
    intermediate_size: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        gate, up = fused_dense(x, [(self.intermediate_size, ("embed", "mlp"), "gate_proj"),
                                   (self.intermediate_size, ("embed", "mlp"), "up_proj")],
                               use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                               param_dtype=self.param_dtype)
        hidden = nn.with_logical_constraint(jnp.tanh(up) * jax.nn.silu(gate),
                                            ("activation_batch", "activation_length", "activation_mlp"))
        return dense(self.hidden_size, ("mlp", "embed"), use_bias=self.use_bias, init_std=self.init_std,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="down_proj")(hidden)


class _ExpertParams(nn.Module):
    """One expert's private projections: {name: (kernel [in, out], bias or None)} for specs (name, in, out, axes,
    bias)."""

    specs: tuple
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return {name: DenseParams(n_in, n_out, axes, bias, self.init_std, self.param_dtype, name=name)()
                for name, n_in, n_out, axes, bias in self.specs}


def _expert_dense(x, params, name, dtype):
    """x [N, E, in] or [N, in] with the experts' stacked (kernel [E, in, out], bias [E, out]) -> [N, E, out]."""
    kernel = jnp.stack([p[name][0] for p in params]).astype(dtype)
    eq = "nei,eio->neo" if x.ndim == 3 else "ni,eio->neo"
    y = jnp.einsum(eq, x.astype(dtype), kernel)
    if params[0][name][1] is not None:
        y = y + jnp.stack([p[name][1] for p in params]).astype(dtype)
    return y


def router_aux_statistics(probs, expert_ids, token_mask):
    """probs [N, E] f32, expert_ids [N, k], token_mask [N] -> (selections [E], prob_sums [E], tokens): the
    pieces of the load-balancing loss, padding excluded (summed over layers, then `router_aux_loss`)."""
    w = token_mask.astype(jnp.float32)
    sel = jnp.sum(jax.nn.one_hot(expert_ids, probs.shape[-1], dtype=jnp.float32), axis=1)   # [N, E]
    return jnp.einsum("n,ne->e", w, sel), jnp.einsum("n,ne->e", w, probs), jnp.sum(w)


class SharedMoE(nn.Module):
    """x [b, s, d] -> (out [b, s, d], aux statistics or None). Params named like upstream: router,
    shared_{gate,up,down}_proj / shared_up_proj, experts_{e}/{gate_proj, up_proj, down_proj, shared_expert_gate}."""

    config: OTCEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, token_mask: Optional[jax.Array] = None, compute_aux: bool = False):
        cfg = self.config
        b, s, d = x.shape
        n, ne, k = b * s, cfg.num_experts, cfg.num_experts_per_tok
        std, bias, dt = cfg.initializer_range, cfg.hidden_bias, self.dtype
        u = x.reshape(n, d)

        logits = dense(ne, ("embed", "experts"), use_bias=False, init_std=std, dtype=dt,
                       param_dtype=self.param_dtype, name="router")(u).astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_i = jax.lax.top_k(probs, k)
        weights = jnp.zeros((n, ne), dt).at[jnp.arange(n)[:, None], top_i].set(top_p.astype(dt))  # [N, E]

        half, full = cfg.private_expert_intermediate_size, cfg.intermediate_size
        if cfg.expert_type == "expansive":
            specs = (("gate_proj", d, half, ("embed", "mlp"), bias), ("up_proj", d, half, ("embed", "mlp"), bias),
                     ("down_proj", half, d, ("mlp", "embed"), bias),
                     ("shared_expert_gate", d, 1, ("embed", None), False))
        elif cfg.expert_type == "cohesive":
            specs = (("gate_proj", d, half, ("embed", "mlp"), bias), ("down_proj", half, d, ("mlp", "embed"), bias))
        else:
            specs = (("gate_proj", d, full, ("embed", "mlp"), bias), ("up_proj", d, full, ("embed", "mlp"), bias),
                     ("down_proj", full, d, ("mlp", "embed"), bias))
        experts = [_ExpertParams(specs, std, self.param_dtype, name=f"experts_{e}")() for e in range(ne)]

        if cfg.expert_type == "expansive":
            size = cfg.shared_expert_intermediate_size                                     # the shared MLP
            sg, su = fused_dense(u, [(size, ("embed", "mlp"), "shared_gate_proj"),
                                     (size, ("embed", "mlp"), "shared_up_proj")],
                                 use_bias=bias, init_std=std, dtype=dt, param_dtype=self.param_dtype)
            sh = dense(d, ("mlp", "embed"), use_bias=bias, init_std=std, dtype=dt, param_dtype=self.param_dtype,
                       name="shared_down_proj")(jnp.tanh(su) * jax.nn.silu(sg))          # [N, d]
            gate = jax.nn.sigmoid(_expert_dense(sh, experts, "shared_expert_gate", dt))    # [N, E, 1]
            h = gate * sh[:, None, :]                                                      # [N, E, d]
            act = jnp.tanh(_expert_dense(h, experts, "up_proj", dt)) * jax.nn.silu(
                _expert_dense(h, experts, "gate_proj", dt))
        elif cfg.expert_type == "cohesive":
            up = dense(half, ("embed", "mlp"), use_bias=bias, init_std=std, dtype=dt, param_dtype=self.param_dtype,
                       name="shared_up_proj")(u)                                           # [N, I/2]
            act = jnp.tanh(up)[:, None, :] * jax.nn.silu(_expert_dense(u, experts, "gate_proj", dt))
        else:
            act = jnp.tanh(_expert_dense(u, experts, "up_proj", dt)) * jax.nn.silu(
                _expert_dense(u, experts, "gate_proj", dt))
        y = _expert_dense(act, experts, "down_proj", dt)                                   # [N, E, d]
        out = jnp.einsum("ne,ned->nd", weights, y).reshape(b, s, d)

        stats = None
        if compute_aux:
            mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.reshape(n)
            stats = router_aux_statistics(probs, top_i, mask)
            self.sow("intermediates", "router_logits", logits)
        return out, stats
