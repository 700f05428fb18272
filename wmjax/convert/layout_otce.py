"""The tensor layout of an OTCE checkpoint (upstream `CheemsOTCEForCausalLM` state dict; spec
/work/shared/research/ssd_cheems_otce.md §6.2): upstream key <-> wmjax param path, torch shape, transpose.

Shared experts: upstream's MoE layers hold the layer-level shared projections (`feed_forward.shared_*`) as the
same Parameter inside every expert, so the state dict lists each one 1 + num_experts times
(`feed_forward.experts.{e}.shared_*`). Every copy is an `Entry` naming the same wmjax param; the generic
reader checks that the copies agree and the writer writes them all (`wmjax.convert.core`; a pytorch_model.bin,
since safetensors refuses shared tensors, spec §2.7).

Conv1d weight [E, 1, K] <-> kernel [K, 1, E] (all axes reversed, like a Linear's transpose).
"""

from __future__ import annotations

from wmjax.configs.otce import OTCEConfig
from wmjax.convert.layout import Entry

__all__ = ["layout", "unique_params"]


def layout(config: OTCEConfig) -> list[Entry]:
    """Every tensor of an upstream OTCE state dict for `config` (aliases included; a tied lm_head excluded)."""
    c = config
    V, d, I = c.vocab_size, c.hidden_size, c.intermediate_size
    H, G, P = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    E, N, R, K = c.mamba_inner_size, c.mamba_d_state, c.dt_rank, c.mamba_d_conv
    out: list[Entry] = [Entry("model.embed_tokens.word_embeddings.weight",
                              ("model", "embed_tokens", "word_embeddings", "embedding"), (V, d), False)]
    if c.type_vocab_size is not None:
        out.append(Entry("model.embed_tokens.token_type_embeddings.weight",
                         ("model", "embed_tokens", "token_type_embeddings", "embedding"), (c.type_vocab_size, d),
                         False))

    for i, (stage, moe) in enumerate(zip(c.stages, c.moe_layers)):
        p, fp = f"model.layers.{i}.", ("model", f"layers_{i}")

        def lin(key, path, n_out, n_in, bias):
            out.append(Entry(f"{p}{key}.weight", fp + path + ("kernel",), (n_out, n_in), True))
            if bias:
                out.append(Entry(f"{p}{key}.bias", fp + path + ("bias",), (n_out,), False))

        def norm(key, path, n):
            out.append(Entry(f"{p}{key}.weight", fp + path + ("weight",), (n,), False))
            out.append(Entry(f"{p}{key}.bias", fp + path + ("bias",), (n,), False))

        def mlp(key, path, inter, names=("gate_proj", "up_proj", "down_proj")):
            for name in names:
                shape = (d, inter) if name.endswith("down_proj") else (inter, d)
                lin(f"{key}.{name}", path + (name,), *shape, c.hidden_bias)

        norm("input_layernorm", ("input_layernorm",), d)
        if stage in ("observation", "conseption"):
            m, mp = "mamba", ("mamba",)
            out.append(Entry(f"{p}{m}.A_log", fp + mp + ("A_log",), (E, N), False))
            out.append(Entry(f"{p}{m}.D", fp + mp + ("D",), (E,), False))
            out.append(Entry(f"{p}{m}.conv1d.weight", fp + mp + ("conv1d", "kernel"), (E, 1, K), True))
            if c.mamba_conv_bias:
                out.append(Entry(f"{p}{m}.conv1d.bias", fp + mp + ("conv1d", "bias"), (E,), False))
            lin(f"{m}.in_proj", mp + ("in_proj",), 2 * E, d, c.mamba_proj_bias)
            lin(f"{m}.x_proj", mp + ("x_proj",), R + 2 * N, E, False)
            lin(f"{m}.dt_proj", mp + ("dt_proj",), E, R, c.mamba_proj_bias)
            lin(f"{m}.out_proj", mp + ("out_proj",), d, E, c.mamba_proj_bias)
            norm(f"{m}.dt_layernorm", mp + ("dt_layernorm",), R)
            norm(f"{m}.B_layernorm", mp + ("B_layernorm",), N)
            norm(f"{m}.C_layernorm", mp + ("C_layernorm",), N)
        else:
            a = "self_attn" if stage == "thinking" else "self_attention"
            lin(f"{a}.q_proj", (a, "q_proj"), H * P, d, c.hidden_bias)
            lin(f"{a}.k_proj", (a, "k_proj"), G * P, d, c.hidden_bias)
            lin(f"{a}.v_proj", (a, "v_proj"), G * P, d, c.hidden_bias)
            lin(f"{a}.o_proj", (a, "o_proj"), d, H * P, c.hidden_bias)
        norm("pre_ff_layernorm", ("pre_ff_layernorm",), d)

        ff, fpp = "feed_forward", ("feed_forward",)
        if not moe:
            mlp(ff, fpp, I)
        else:
            lin(f"{ff}.router", fpp + ("router",), c.num_experts, d, False)
            half = c.private_expert_intermediate_size
            if c.expert_type == "expansive":
                shared = ("shared_gate_proj", "shared_up_proj", "shared_down_proj")
                mlp(ff, fpp, c.shared_expert_intermediate_size, shared)
            elif c.expert_type == "cohesive":
                shared = ("shared_up_proj",)
                mlp(ff, fpp, c.shared_expert_intermediate_size, shared)
            else:
                shared = ()
            for e in range(c.num_experts):
                ek, ep = f"{ff}.experts.{e}", fpp + (f"experts_{e}",)
                mlp(ek, fpp, c.shared_expert_intermediate_size, shared)  # aliases of the layer-level tensors
                if c.expert_type == "expansive":
                    mlp(ek, ep, half)
                    lin(f"{ek}.shared_expert_gate", ep + ("shared_expert_gate",), 1, d, False)
                elif c.expert_type == "cohesive":
                    mlp(ek, ep, half, ("gate_proj", "down_proj"))
                else:
                    mlp(ek, ep, I)
        if stage == "expression":
            norm("pre_dense_layernorm", ("pre_dense_layernorm",), d)
            lin("dense", ("dense",), d, d, c.hidden_bias)
            lin("projection", ("projection",), d, d, c.hidden_bias)

    out.append(Entry("model.final_layernorm.weight", ("model", "final_layernorm", "weight"), (d,), False))
    out.append(Entry("model.final_layernorm.bias", ("model", "final_layernorm", "bias"), (d,), False))
    if not c.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (V, d), True))
    return out


def unique_params(config: OTCEConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined wmjax param path -> flax shape, one per param (aliases collapsed)."""
    return {e.flat_path: e.flax_shape for e in layout(config)}
