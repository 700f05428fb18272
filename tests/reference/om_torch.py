"""A PyTorch reference of the Om LLM written from shared/research/om_arc.md (§2 ARC, §3.1 RoPE, §4 ARCformer,
§5 OmLLM), for parity tests of wmjax.models.om. Module and parameter names follow the upstream `state_dict`
names (§7.1), so a state dict of this module is an upstream-format checkpoint (stacked layout; the RoPE constants
are not saved: upstream's own are recomputed, wmjax ignores them).

Deliberately plain: a Python loop over segments with the exact (unpadded) length of a partial last segment, each
segment re-embedding its own window of L + d raw tokens, one module per upstream module. `cfg` is a
wmjax.configs.om.OmConfig (only its fields are read). Heavyball flags implement the intended behaviour (all q/k/v
rows normalized, end rows not attending start rows when end_attends_start=False).

    model = OmLLMRef(cfg); logits, states = model(x)          # x [B, T] raw tokens, the first d context only
    logits [B, T - d, V]; states: list of [B, S, D] after the last COMPLETE segment (next_token semantics)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class StackedLinear(nn.Module):
    """Per-head weights [1, H, in, out]; x [B, H, N, in] (or [B, N, in], shared by the heads) -> [B, H, N, out]."""

    def __init__(self, heads, d_in, d_out):
        super().__init__()
        self.weights = nn.Parameter(torch.randn(1, heads, d_in, d_out) * math.sqrt(1.0 / d_out))

    def forward(self, x):
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return x @ self.weights


def rope_angles(n, dk, cfg):
    if cfg.rope == "none":
        return None
    eff = int(math.ceil(dk * cfg.rope_pct))
    i = torch.arange(1, eff // 2 + 1, dtype=torch.float64)
    if cfg.rope == "om_compat":
        theta = cfg.rope_theta ** (-2.0 * i)
    else:
        theta = cfg.rope_theta ** (-2.0 * (i - 1.0) / eff)
    m = torch.arange(1, n + 1, dtype=torch.float64)
    return (m[:, None] * theta[None, :]).float()          # [n, eff/2]


def rope(x, angles):
    """Rotate interleaved pairs (2i-2, 2i-1) of the first eff features of x [..., n, dk]."""
    if angles is None:
        return x
    eff = 2 * angles.shape[-1]
    x0, x1 = x[..., 0:eff:2], x[..., 1:eff:2]
    c, s = torch.cos(angles), torch.sin(angles)
    r0 = x0 * c - x1 * s
    r1 = x1 * c + x0 * s
    rot = torch.stack([r0, r1], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., eff:]], dim=-1)


class StatefulCausalAttention(nn.Module):
    """One pass over z = [start (S) | x | end (S)]; start and end rows share the *_state projections."""

    def __init__(self, cfg, p):
        super().__init__()
        H, dk, dv = cfg.num_attention_heads, cfg.dims_key[p], cfg.dims_value[p]
        din = cfg.hidden_size if p == 0 else cfg.dims_value[p - 1]
        self.cfg, self.p, self.S = cfg, p, cfg.state_len
        self.proj_q, self.proj_k, self.proj_v = StackedLinear(H, din, dk), StackedLinear(H, din, dk), \
            StackedLinear(H, din, dv)
        self.proj_q_state, self.proj_k_state, self.proj_v_state = StackedLinear(H, din, dk), \
            StackedLinear(H, din, dk), StackedLinear(H, din, dv)
        scale = cfg.scaling_factors[p] if cfg.scaling_factors is not None else 1.0 / math.sqrt(dk)
        if cfg.qkv_norm:
            self.scaling_factor = nn.Parameter(torch.full((H,), float(scale)))
        else:
            self.scale = float(scale)

    def forward(self, z):
        S = self.S
        n = z.shape[-2]
        zs, zx, ze = z[..., :S, :], z[..., S:n - S, :], z[..., n - S:, :]

        def qkv(w, w_st):
            return torch.cat([w_st(zs), w(zx), w_st(ze)], dim=-2).float()

        q, k, v = qkv(self.proj_q, self.proj_q_state), qkv(self.proj_k, self.proj_k_state), \
            qkv(self.proj_v, self.proj_v_state)
        if self.cfg.qkv_norm:
            q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(v, dim=-1)
            scale = self.scaling_factor.view(1, -1, 1, 1)
        else:
            scale = self.scale
        ang = rope_angles(n, self.cfg.dims_key[self.p], self.cfg)
        q, k = rope(q, ang), rope(k, ang)
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if not self.cfg.end_attends_start:
            allowed[n - S:, :S] = False
        logits = (q @ k.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(logits, dim=-1) @ v).to(z.dtype)


class StatefulCausalMultiAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_modules = nn.ModuleList([StatefulCausalAttention(cfg, p) for p in range(len(cfg.dims_key))])
        self.heads = cfg.num_attention_heads
        H, dv, r = cfg.num_attention_heads, cfg.dims_value[-1], cfg.proj_rank
        self.has_proj = dv != r
        if self.has_proj:
            self.proj_out = StackedLinear(H, dv, r)
            self.proj_out_state = StackedLinear(H, dv, r)

    def forward(self, z):
        z = z.unsqueeze(1).expand(-1, self.heads, -1, -1)
        for m in self.attn_modules:
            z = m(z)
        return z


class ARCStacked(nn.Module):
    def __init__(self, cfg, layer_num):
        super().__init__()
        S, D, H, r = cfg.state_len, cfg.hidden_size, cfg.num_attention_heads, cfg.proj_rank
        self.S = S
        self.init_state = nn.Parameter(torch.randn(1, S, D) / (math.sqrt(0.4) if layer_num == 0 else 1.0))
        self.attn = StatefulCausalMultiAttention(cfg)
        self.proj_out = nn.Linear(H * r, D, bias=False)
        self.proj_out_state = nn.Linear(H * r, D, bias=False)
        std = 1.0 / math.sqrt(2 * cfg.num_hidden_layers)
        nn.init.normal_(self.proj_out.weight, std=std)
        nn.init.normal_(self.proj_out_state.weight, std=std)

    def forward(self, x, state):
        B, S = x.shape[0], self.S
        state = state.expand(B, -1, -1)
        z = self.attn(torch.cat([state, x, state], dim=1))          # [B, H, N, dv]
        n = z.shape[2]
        mid, end = z[:, :, S:n - S], z[:, :, n - S:]
        if self.attn.has_proj:
            mid, end = self.attn.proj_out(mid), self.attn.proj_out_state(end)
        flat = lambda t: t.transpose(1, 2).reshape(B, t.shape[2], -1)
        return self.proj_out(flat(mid)), self.proj_out_state(flat(end))


class ARCformer(nn.Module):
    def __init__(self, cfg, layer_num):
        super().__init__()
        D, Fh = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.attn = ARCStacked(cfg, layer_num)
        act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "abs": _Abs()}[cfg.hidden_act]
        b = cfg.mlp_bias
        if cfg.mlp_1221:
            self.mlp = nn.Sequential(nn.Linear(D, Fh // 2, bias=b), act, nn.Linear(Fh // 2, Fh // 2, bias=b), act,
                                     nn.Linear(Fh // 2, D, bias=b))
        else:
            self.mlp = nn.Sequential(nn.Linear(D, Fh, bias=b), act, nn.Linear(Fh, D, bias=b))
        nn.init.normal_(self.mlp[-1].weight, std=math.sqrt(1.0 / (2 * cfg.num_hidden_layers)))
        eps = cfg.layer_norm_eps
        if cfg.attn_norm:
            self.attn_norm = nn.LayerNorm(D, eps=eps)
        if cfg.state_norm:
            self.state_norm = nn.LayerNorm(D, eps=eps)
        self.mlp_norm = nn.LayerNorm(D, eps=eps) if cfg.mlp_norm == "layernorm" else nn.RMSNorm(D, eps=eps)

    def forward(self, x, state):
        y, m = self.attn(x, state)
        x = x + y
        if self.cfg.attn_norm:
            x = self.attn_norm(x)
        x = self.mlp_norm(x + self.mlp(x))
        if self.cfg.state_norm:
            m = self.state_norm(m)
        return x, m


class _Abs(nn.Module):
    def forward(self, x):
        return x.abs()


class NGramEmbedding(nn.Module):
    def __init__(self, D, k):
        super().__init__()
        self.k = k
        rank = D // k
        self.ngram_down_proj = nn.Linear(k * D, rank, bias=False)
        self.ngram_up_proj = nn.Linear(rank, D, bias=False)
        nn.init.normal_(self.ngram_down_proj.weight, std=1.0 / math.sqrt(rank))
        nn.init.normal_(self.ngram_up_proj.weight, std=1.0 / math.sqrt(D))

    def forward(self, e):
        W = e.shape[1]
        u = torch.stack([torch.cat([e[:, j + i] for i in range(self.k)], dim=-1) for j in range(W - self.k + 1)],
                        dim=1)
        return self.ngram_up_proj(self.ngram_down_proj(u))


class OmLLMRef(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedder = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        nn.init.normal_(self.embedder.weight, std=math.sqrt(0.4))
        self.ngram_embs = nn.ModuleList([NGramEmbedding(cfg.hidden_size, k) for k in cfg.ngram_sizes])
        self.layers = nn.ModuleList([ARCformer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x, states=None):
        cfg = self.cfg
        L, d = cfg.segment_len, max(cfg.ngram_sizes) - 1
        B, T = x.shape
        T_out = T - d
        if not states:
            states = [layer.attn.init_state for layer in self.layers]
        n_seg = -(-T_out // L)
        outs = []
        for s in range(n_seg):
            w = x[:, s * L: min((s + 1) * L + d, T)]
            e = self.embedder(w)
            if cfg.zero_pad_embeddings and cfg.pad_token_id is not None:
                e = e * (w != cfg.pad_token_id).unsqueeze(-1).to(e.dtype)
            h = e[:, d:]
            for mod, k in zip(self.ngram_embs, cfg.ngram_sizes):
                h = h + mod(e)[:, d - k + 1:]
            new_states = []
            for layer, st in zip(self.layers, states):
                h, st_new = layer(h, st)
                new_states.append(st_new)
            if h.shape[1] == L:  # a partial last segment never advances the states
                states = new_states
            outs.append(self.proj_out(h))
        return torch.cat(outs, dim=1), [st.expand(B, -1, -1) for st in states]
