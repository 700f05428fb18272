"""Two-way conversion between Hugging Face `transformers` Doge checkpoints and wmjax params (doge.md s6).

    config, params = load_hf("hf_dir")              # dir (config.json + model.safetensors / pytorch_model.bin /
                                                    # sharded index), a single file or a state dict (+ config=)
    save_hf(config, params, "out_dir")              # transformers.DogeForCausalLM.from_pretrained loads it
    sd = to_state_dict(config, params); params = from_state_dict(config, sd)
    save_wmjax(config, params, "dir"); config, params = load_wmjax("dir")   # wmjax-native (keeps layout flags)

CLI: `python -m wmjax.convert --from hf DIR --to wmjax DIR` (and `--from wmjax ... --to hf`, `--from hf --to hf`
to migrate a legacy SmallDoge checkpoint to the HF-native layout where that is lossless).

Legacy SmallDoge checkpoints (doge.md s4.6, s6.3) are read too: pre-2025-06-19 key names (`model.word_embed`,
`pre_layernorm`, `pre_residual.weight`, `post_layernorm`, `post_residual.weight`, `final_layernorm`,
`feed_forward.*`; `router_gate.bias` dropped), no q/k norm (-> `qk_norm=False`) and `A`/`dt_proj` sized by the
query heads (-> `dt_heads="query"`). Writing them as HF-native is lossless for old names with HF-native shapes and
for `dt_heads="query"` when num_attention_heads == num_key_value_heads; otherwise `save_hf` raises explaining why.

Every error is a `ConversionError` (or `ConfigError` for config.json problems) whose message lists every offending
key with expected / found shapes and the file; writers never leave a half-written destination.
"""

from wmjax.convert.core import (WMJAX_CONFIG, WMJAX_PARAMS, detect_layout, flatten_params, from_state_dict,
                                load_hf, load_wmjax, save_hf, save_wmjax, to_state_dict, unflatten_params)
from wmjax.convert.layout import ConversionError, hf_layout, hf_native_problem

__all__ = ["ConversionError", "load_hf", "save_hf", "to_state_dict", "from_state_dict", "save_wmjax", "load_wmjax",
           "detect_layout", "hf_layout", "hf_native_problem", "flatten_params", "unflatten_params", "convert",
           "WMJAX_CONFIG", "WMJAX_PARAMS"]


def convert(src_format: str, src: str, dst_format: str, dst: str, *, overwrite: bool = False, dtype=None,
            legacy="auto", progress: bool = False):
    """Read `src` (format "hf" | "wmjax") and write `dst` (format "hf" | "wmjax"); returns the config."""
    if src_format == "hf":
        config, params = load_hf(src, legacy=legacy, dtype=dtype, progress=progress)
    elif src_format == "wmjax":
        config, params = load_wmjax(src, dtype=dtype, progress=progress)
    else:
        raise ValueError(f"unknown source format {src_format!r} (expected 'hf' or 'wmjax')")
    if dst_format == "hf":
        save_hf(config, params, dst, overwrite=overwrite, progress=progress)
    elif dst_format == "wmjax":
        save_wmjax(config, params, dst, overwrite=overwrite, progress=progress)
    else:
        raise ValueError(f"unknown destination format {dst_format!r} (expected 'hf' or 'wmjax')")
    return config
