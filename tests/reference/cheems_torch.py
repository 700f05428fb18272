"""A PyTorch Cheems written from the spec (/work/shared/research/ssd_cheems_otce.md 1.3-1.7, 6.1), for parity tests.

It follows upstream's dense prefill path: module and state-dict names of `CheemsForCausalLM`, the SSD as the
exact (unclamped) recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, computed token by token
in float32 (no chunking, no mamba_ssm), eager attention with the dynamic-mask bias exp(A softplus(dt_proj(v)))
added to the scores, the product-key CDMoE. Not upstream code: no cache, no attention mask, no dropout.
wmjax's `ssd_a="negative_exp"` is supported too (parameter `ssd.A_log`, A = -exp(A_log)).

    model = CheemsForCausalLMTorch(config)     # config: wmjax.configs.cheems.CheemsConfig (read only)
    logits = model(input_ids)                  # [b, L, V] float32
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .torch_common import init_weights_, rotate_half

__all__ = ["CheemsForCausalLMTorch", "randomize_"]


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, residual, h):
        return self.weight * residual + h


def rope_cos_sin(cfg, position_ids, dim):
    """cos, sin [b, L, dim] (rotate_half layout); dynamic NTK recomputes the base from max(position_ids) + 1."""
    base = cfg.rope_theta
    pos = position_ids.float()
    if cfg.rope_type == "dynamic":
        seq = float(position_ids.max()) + 1
        if seq > cfg.max_position_embeddings:
            f = cfg.rope_factor
            base = base * ((f * seq / cfg.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    elif cfg.rope_type == "linear":
        pos = pos / cfg.rope_factor
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = pos[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin, head_axis):
    """x with a heads axis at `head_axis` (1 for [b, H, L, P], 2 for [b, L, H, P]); cos/sin [b, L, P]."""
    cos, sin = cos.unsqueeze(head_axis), sin.unsqueeze(head_axis)
    return x * cos + rotate_half(x) * sin


class SSD(nn.Module):
    """CheemsStateSpaceDuality: separate projections, raw A (or A_log), G = H, N = P, RoPE on B and C."""

    def __init__(self, cfg):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.H, self.P, self.mode = H, d // H, cfg.ssd_a
        bias = cfg.hidden_bias
        self.c_proj = nn.Linear(d, d, bias=bias)
        self.b_proj = nn.Linear(d, d, bias=bias)
        self.x_proj = nn.Linear(d, d, bias=bias)
        self.dt_proj = nn.Linear(d, H, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)
        if self.mode == "raw":
            self.A = nn.Parameter(torch.ones(H))
        else:
            self.A_log = nn.Parameter(torch.zeros(H))

    def forward(self, u, cos, sin):
        b, L, _ = u.shape
        H, P = self.H, self.P
        C = apply_rope(self.c_proj(u).view(b, L, H, P), cos, sin, 2).float()
        B = apply_rope(self.b_proj(u).view(b, L, H, P), cos, sin, 2).float()
        x = self.x_proj(u).view(b, L, H, P).float()
        dt = F.softplus(self.dt_proj(u).float())                       # [b, L, H]
        A = self.A.float() if self.mode == "raw" else -torch.exp(self.A_log.float())
        S = torch.zeros(b, H, P, P, dtype=torch.float32)
        ys = []
        for t in range(L):
            decay = torch.exp(dt[:, t] * A)                             # [b, H]
            S = decay[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
            ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
        y = torch.stack(ys, dim=1).to(u.dtype)                          # [b, L, H, P]
        return self.out_proj(y.reshape(b, L, H * P))


class DynamicMaskAttention(nn.Module):
    """CheemsDynamicMaskAttention (eager), dynamic_mask_ratio = 0: bias_j = exp(A softplus(dt_proj(v_j))) per
    query head, added to every causal score."""

    def __init__(self, cfg):
        super().__init__()
        d, H, G = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        P = d // H
        self.H, self.G, self.P = H, G, P
        bias = cfg.hidden_bias
        self.q_proj = nn.Linear(d, H * P, bias=bias)
        self.k_proj = nn.Linear(d, G * P, bias=bias)
        self.v_proj = nn.Linear(d, G * P, bias=bias)
        self.dt_proj = nn.Linear(G * P, H, bias=bias)
        self.A = nn.Parameter(torch.ones(H))
        self.o_proj = nn.Linear(H * P, d, bias=bias)

    def forward(self, u, cos, sin):
        b, L, _ = u.shape
        H, G, P = self.H, self.G, self.P
        q = self.q_proj(u).view(b, L, H, P).transpose(1, 2)
        k = self.k_proj(u).view(b, L, G, P).transpose(1, 2)
        v = self.v_proj(u).view(b, L, G, P).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, 1), apply_rope(k, cos, sin, 1)
        dt = self.dt_proj(v.transpose(1, 2).reshape(b, L, G * P))      # [b, L, H]
        mask = torch.exp(self.A * F.softplus(dt)).transpose(1, 2)       # [b, H, L]
        bias = mask[:, :, None, :].expand(b, H, L, L)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        bias = bias.masked_fill(~causal, torch.finfo(u.dtype).min)
        k = k.repeat_interleave(H // G, dim=1)
        v = v.repeat_interleave(H // G, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(P) + bias
        probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, L, H * P)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_bias
        self.gate_proj = nn.Linear(d, I, bias=bias)
        self.up_proj = nn.Linear(d, I, bias=bias)
        self.down_proj = nn.Linear(I, d, bias=bias)

    def forward(self, u):
        return self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u))


class CDMoE(MLP):
    """Product-key CDMoE: per-head queries split in two halves, top-k per half, k^2 candidates, top-k, softmax per
    head, single-neuron experts from down_embed / up_embed, plus the dense gated MLP."""

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.hidden_size
        self.heads, self.R, self.k = cfg.num_cdmoe_heads, cfg.expert_retrieval_size, cfg.num_cdmoe_experts_per_head
        self.K = int(math.sqrt(cfg.num_cdmoe_experts))
        self.queries = nn.Linear(d, self.heads * self.R, bias=False)
        self.keys = nn.Parameter(torch.zeros(self.heads, self.K, 2, self.R // 2))
        self.down_embed = nn.Embedding(cfg.num_cdmoe_experts, d)
        self.up_embed = nn.Embedding(cfg.num_cdmoe_experts, d)

    def forward(self, u):
        b, t, _ = u.shape
        q = self.queries(u).view(b, t, 2, self.heads, self.R // 2)
        sim = torch.einsum("btphn,hkpn->pbthk", q, self.keys)
        (sx, ix), (sy, iy) = sim[0].topk(self.k, dim=-1), sim[1].topk(self.k, dim=-1)
        all_scores = (sx[..., :, None] + sy[..., None, :]).reshape(b, t, self.heads, self.k * self.k)
        all_ids = (ix[..., :, None] * self.K + iy[..., None, :]).reshape(b, t, self.heads, self.k * self.k)
        scores, pos = all_scores.topk(self.k, dim=-1)
        ids = all_ids.gather(-1, pos)                                   # [b, t, heads, k]
        w = F.silu(torch.einsum("btd,bthkd->bthk", u, self.down_embed(ids))) * F.softmax(scores, dim=-1)
        experts = torch.einsum("bthk,bthkd->btd", w, self.up_embed(ids))
        return super().forward(u) + experts


class DecoderLayer(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        d = cfg.hidden_size
        self.kind = kind
        self.pre_sequence_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        if kind == "ssd":
            self.ssd = SSD(cfg)
        else:
            self.attn = DynamicMaskAttention(cfg)
        self.post_sequence_residual = Residual(d)
        self.pre_state_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.feed_forward = CDMoE(cfg) if cfg.is_moe else MLP(cfg)
        self.post_state_residual = Residual(d)

    def forward(self, h, cos, sin):
        mixer = self.ssd if self.kind == "ssd" else self.attn
        h = self.post_sequence_residual(h, mixer(self.pre_sequence_layernorm(h), cos, sin))
        return self.post_state_residual(h, self.feed_forward(self.pre_state_layernorm(h)))


class CheemsModelTorch(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        kinds = ["attn" if i % cfg.attn_layer_period == cfg.attn_layer_offset else "ssd"
                 for i in range(cfg.num_hidden_layers)]
        self.layers = nn.ModuleList([DecoderLayer(cfg, k) for k in kinds])
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, position_ids=None):
        b, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L)[None].expand(b, L)
        h = self.word_embed(input_ids)
        cos, sin = rope_cos_sin(self.cfg, position_ids, self.cfg.hidden_size // self.cfg.num_attention_heads)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.final_layernorm(h)


class CheemsForCausalLMTorch(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = CheemsModelTorch(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embed.weight
        init_weights_(self, cfg.initializer_range)

    def forward(self, input_ids, position_ids=None):
        return self.lm_head(self.model(input_ids, position_ids)).float()


def randomize_(model, seed=0, a_scale=0.05):
    """Perturb every parameter away from its init so that no mapping mistake hides behind ones / zeros: Linear
    weights and embeddings N(0, 1 / in_features), 1-D weights (norms, residuals) 1 + 0.1 N(0, 1), biases
    0.02 N(0, 1), attention A N(0, 1) (well-spread biases), CDMoE keys N(0, 1) (no ties in the top-k),
    SSD raw A uniform in [-a_scale, a_scale] (finite for short sequences), SSD A_log N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ssd.A"):
                p.copy_(a_scale * (2 * torch.rand(p.shape, generator=g) - 1))
            elif name.endswith("ssd.A_log"):
                p.copy_(0.5 * rn(p))
            elif name.endswith("attn.A") or name.endswith(".keys"):
                p.copy_(rn(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * rn(p))
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * rn(p))
            else:
                p.copy_(rn(p) / math.sqrt(p.shape[1]))  # unit-scale activations
    return model
