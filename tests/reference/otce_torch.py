"""A PyTorch reference of OTCE written from the spec (/work/shared/research/ssd_cheems_otce.md §2, §6.2), for
parity tests: the upstream module tree and state-dict keys (shared experts' tensors aliased under every expert),
the upstream dense-prefill math (SDPA attention, the slow-path selective scan as a plain loop in f32), with the
intended behaviour where upstream is broken (docs/OTCE.md): the aux loss's masked / unmasked branches the right
way round, no cache (a fresh forward over the whole sequence; the logn index is the position in the call).

    model = OTCEForCausalLMRef(cfg)      # cfg: an upstream config.json dict (OTCEConfig.to_upstream_dict())
    logits, router_logits = model(input_ids)               # [b, L, V] f32, tuple of [b*L, E_n] per MoE layer
    aux = load_balancing_loss(router_logits, E_n, k, attention_mask)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .torch_common import init_weights_, rotate_half


def rotary_cos_sin(seq_len, dim, theta, dtype=torch.float32):
    """[L, dim] cos / sin of the rotate_half convention, positions 0..L-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    """weight (1) and bias (0): ((w * x_hat).to(in_dtype) + b).to(in_dtype), statistics in f32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight * x32).to(dtype) + self.bias).to(dtype)


class MambaMixer(nn.Module):
    """Selective SSM mixer (spec §2.4), slow path."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.E = E = cfg["mamba_expand"] * d
        self.N = N = cfg["mamba_d_state"]
        self.R = R = cfg["mamba_dt_rank"]
        K = cfg["mamba_d_conv"]
        self.rope, self.theta = cfg["mamba_rope"], cfg["rope_theta"]
        self.in_proj = nn.Linear(d, 2 * E, bias=cfg["mamba_proj_bias"])
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1, bias=cfg["mamba_conv_bias"])
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=cfg["mamba_proj_bias"])
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=cfg["mamba_proj_bias"])
        eps = cfg["rms_norm_eps"]
        self.dt_layernorm = RMSNorm(R, eps)
        self.B_layernorm = RMSNorm(N, eps)
        self.C_layernorm = RMSNorm(N, eps)

    def forward(self, h):
        b, L, _ = h.shape
        xz = self.in_proj(h).transpose(1, 2)                     # [b, 2E, L]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :L])                       # [b, E, L]
        params = self.x_proj(x.transpose(1, 2))
        dt, B, C = torch.split(params, [self.R, self.N, self.N], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.B_layernorm(B), self.C_layernorm(C)
        if self.rope:
            cos, sin = rotary_cos_sin(L, self.N, self.theta, B.dtype)
            B, C = apply_rotary(B, cos, sin), apply_rotary(C, cos, sin)
        logn = torch.clamp(torch.log(torch.arange(L, dtype=torch.float32) + 65.0) / math.log(4096.0), min=1.0)
        C = C * logn[None, :, None].to(C.dtype)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2).float()   # [b, E, L]
        A = -torch.exp(self.A_log.float())                            # [E, N]
        state = torch.zeros(b, self.E, self.N, dtype=torch.float32)
        xs = x.float()
        ys = []
        for t in range(L):
            dA = torch.exp(A[None] * delta[:, :, t, None])
            dBx = delta[:, :, t, None] * B[:, None, t, :].float() * xs[:, :, t, None]
            state = dA * state + dBx
            ys.append(torch.einsum("ben,bn->be", state, C[:, t, :].float()))
        y = torch.stack(ys, dim=-1)                                   # [b, E, L]
        y = y + xs * self.D[None, :, None]
        y = y * F.silu(z.float())
        return self.out_proj(y.transpose(1, 2).to(h.dtype))


class Attention(nn.Module):
    """Causal GQA + RoPE with SDPA semantics (spec §2.5)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.H, self.G = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.P = d // self.H
        bias = cfg["hidden_bias"]
        self.rope, self.theta = cfg["attention_rope"], cfg["rope_theta"]
        self.q_proj = nn.Linear(d, self.H * self.P, bias=bias)
        self.k_proj = nn.Linear(d, self.G * self.P, bias=bias)
        self.v_proj = nn.Linear(d, self.G * self.P, bias=bias)
        self.o_proj = nn.Linear(self.H * self.P, d, bias=bias)

    def forward(self, h):
        b, L, _ = h.shape
        q = self.q_proj(h).view(b, L, self.H, self.P).transpose(1, 2)
        k = self.k_proj(h).view(b, L, self.G, self.P).transpose(1, 2)
        v = self.v_proj(h).view(b, L, self.G, self.P).transpose(1, 2)
        if self.rope:
            cos, sin = rotary_cos_sin(L, self.P, self.theta, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = self.H // self.G
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.H * self.P))


class MLP(nn.Module):
    """down(tanh(up(u)) * silu(gate(u)))."""

    def __init__(self, d, inter, bias):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)

    def forward(self, u):
        return self.down_proj(torch.tanh(self.up_proj(u)) * F.silu(self.gate_proj(u)))


class ExpansiveExpert(nn.Module):
    def __init__(self, d, half, bias, shared_gate, shared_up, shared_down):
        super().__init__()
        self.shared_gate_proj, self.shared_up_proj, self.shared_down_proj = shared_gate, shared_up, shared_down
        self.gate_proj = nn.Linear(d, half, bias=bias)
        self.up_proj = nn.Linear(d, half, bias=bias)
        self.down_proj = nn.Linear(half, d, bias=bias)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, u):
        s = self.shared_down_proj(torch.tanh(self.shared_up_proj(u)) * F.silu(self.shared_gate_proj(u)))
        s = torch.sigmoid(self.shared_expert_gate(s)) * s
        return self.down_proj(torch.tanh(self.up_proj(s)) * F.silu(self.gate_proj(s)))


class CohesiveExpert(nn.Module):
    def __init__(self, d, half, bias, shared_up):
        super().__init__()
        self.shared_up_proj = shared_up
        self.gate_proj = nn.Linear(d, half, bias=bias)
        self.down_proj = nn.Linear(half, d, bias=bias)

    def forward(self, u):
        return self.down_proj(torch.tanh(self.shared_up_proj(u)) * F.silu(self.gate_proj(u)))


class SharedMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, inter, bias = cfg["hidden_size"], cfg["intermediate_size"], cfg["hidden_bias"]
        ne, kind = cfg["num_experts"], cfg["expert_type"]
        self.k = cfg["num_experts_per_tok"]
        self.router = nn.Linear(d, ne, bias=False)
        if kind == "expansive":
            self.shared_gate_proj = nn.Linear(d, inter, bias=bias)
            self.shared_up_proj = nn.Linear(d, inter, bias=bias)
            self.shared_down_proj = nn.Linear(inter, d, bias=bias)
            self.experts = nn.ModuleList([ExpansiveExpert(d, inter // 2, bias, self.shared_gate_proj,
                                                          self.shared_up_proj, self.shared_down_proj)
                                          for _ in range(ne)])
        elif kind == "cohesive":
            self.shared_up_proj = nn.Linear(d, inter // 2, bias=bias)
            self.experts = nn.ModuleList([CohesiveExpert(d, inter // 2, bias, self.shared_up_proj)
                                          for _ in range(ne)])
        else:
            self.experts = nn.ModuleList([MLP(d, inter, bias) for _ in range(ne)])

    def forward(self, h):
        b, L, d = h.shape
        u = h.reshape(-1, d)
        logits = self.router(u)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.k, dim=-1)
        weights = weights.to(u.dtype)                      # not renormalised
        out = torch.zeros_like(u)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, expert(u[rows]) * weights[rows, slot, None])
        return out.view(b, L, d), logits


def stage_plan(cfg):
    """[(stage, is_moe)] per layer, from the four counts (spec §2.1)."""
    counts = [cfg["num_observation_layers"], cfg["num_thinking_layers"], cfg["num_conseption_layers"],
              cfg["num_expression_layers"]]
    moe = cfg["num_experts"] > 1
    plan = []
    for i in range(counts[0]):
        plan.append(("observation", moe and i > 0))
    plan += [("thinking", moe)] * counts[1]
    for i in range(counts[2]):
        plan.append(("conseption", moe and i < counts[2] - 1))
    plan += [("expression", False)] * counts[3]
    return plan


class DecoderLayer(nn.Module):
    def __init__(self, cfg, stage, moe):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.stage, self.moe = stage, moe
        self.input_layernorm = RMSNorm(d, eps)
        if stage in ("observation", "conseption"):
            self.mamba = MambaMixer(cfg)
        elif stage == "thinking":
            self.self_attn = Attention(cfg)
        else:
            self.self_attention = Attention(cfg)
        self.pre_ff_layernorm = RMSNorm(d, eps)
        self.feed_forward = SharedMoE(cfg) if moe else MLP(d, cfg["intermediate_size"], cfg["hidden_bias"])
        if stage == "expression":
            self.pre_dense_layernorm = RMSNorm(d, eps)
            self.dense = nn.Linear(d, d, bias=cfg["hidden_bias"])
            self.projection = nn.Linear(d, d, bias=cfg["hidden_bias"])

    def forward(self, x):
        mixer = {"observation": "mamba", "conseption": "mamba", "thinking": "self_attn",
                 "expression": "self_attention"}[self.stage]
        h = x + getattr(self, mixer)(self.input_layernorm(x))
        logits = None
        if self.moe:
            f, logits = self.feed_forward(self.pre_ff_layernorm(h))
        else:
            f = self.feed_forward(self.pre_ff_layernorm(h))
        h = h + f
        if self.stage == "expression":
            h = self.projection(F.silu(self.dense(self.pre_dense_layernorm(h) + x)))
        return h, logits


class Embedding(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], padding_idx=cfg["pad_token_id"])
        self.has_types = cfg.get("type_vocab_size") is not None
        if self.has_types:
            self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], cfg["hidden_size"])

    def forward(self, ids):
        h = self.word_embeddings(ids)
        if self.has_types:
            h = h + self.token_type_embeddings(torch.zeros_like(ids))
        return h


class OTCEModelRef(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = Embedding(cfg)
        self.layers = nn.ModuleList([DecoderLayer(cfg, s, m) for s, m in stage_plan(cfg)])
        self.final_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, ids):
        h = self.embed_tokens(ids)
        router = []
        for layer in self.layers:
            h, logits = layer(h)
            if logits is not None:
                router.append(logits)
        return self.final_layernorm(h), tuple(router)


class OTCEForCausalLMRef(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = OTCEModelRef(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if cfg["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.word_embeddings.weight
        init_weights_(self, cfg["initializer_range"])

    def forward(self, ids):
        h, router = self.model(ids)
        return self.lm_head(h).float(), router


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None):
    """Switch / Mixtral loss over every MoE layer's router logits (concatenated): E * sum_e f_e * P_e, with
    f summed over the k selection slots; with a mask, pads excluded (upstream's branches, the right way round)."""
    logits = torch.cat(list(router_logits), dim=0)
    probs = F.softmax(logits.float(), dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    sel = F.one_hot(chosen, num_experts).float()                      # [T, k, E]
    if attention_mask is None:
        f = sel.mean(0)
        p = probs.mean(0)
    else:
        layers = len(router_logits)
        m = attention_mask.reshape(-1).float().repeat(layers)         # layer-major, as the concatenation
        f = (sel * m[:, None, None]).sum(0) / m.sum()
        p = (probs * m[:, None]).sum(0) / m.sum()
    return num_experts * torch.sum(f * p[None])
