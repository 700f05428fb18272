"""Two-way conversion between Hugging Face `transformers` Doge checkpoints and wmjax params (docs/DOGE.md,
Parameters and state-dict keys).

    config, params = load_hf("hf_dir")              # dir (config.json + model.safetensors / pytorch_model.bin /
                                                    # sharded index), a single file or a state dict (+ config=)
    save_hf(config, params, "out_dir", tokenizer="sp.model")   # transformers.DogeForCausalLM / AutoTokenizer
                                                    # .from_pretrained load it (tokenizer: .model, .json or a dir)
    sd = to_state_dict(config, params); params = from_state_dict(config, sd)
    save_wmjax(config, params, "dir"); config, params = load_wmjax("dir")   # wmjax-native (keeps layout flags)

CLI: `python -m wmjax.convert --from hf DIR --to wmjax DIR` (and `--from wmjax ... --to hf`, `--from hf --to hf`
to migrate a legacy SmallDoge checkpoint to the HF-native layout where that is lossless).

Legacy SmallDoge checkpoints (docs/DOGE.md, Legacy SmallDoge layouts) are read too: pre-2025-06-19 key names
(`model.word_embed`, `pre_layernorm`, `pre_residual.weight`, `post_layernorm`, `post_residual.weight`,
`final_layernorm`, `feed_forward.*`; `router_gate.bias` dropped), no q/k norm (-> `qk_norm=False`) and
`A`/`dt_proj` sized by the query heads (-> `dt_heads="query"`). Writing them as HF-native is lossless for old names with HF-native shapes and
for `dt_heads="query"` when num_attention_heads == num_key_value_heads; otherwise `save_hf` raises explaining why.

Every error is a `ConversionError` (or `ConfigError` for config.json problems) whose message lists every offending
key with expected / found shapes and the file; writers never leave a half-written destination.
"""

import os
import sys

import jax

from wmjax.checkpoint import CheckpointError, load_run
from wmjax.convert.core import (WMJAX_CONFIG, WMJAX_PARAMS, detect_layout, flatten_params, from_state_dict,
                                load_hf, load_wmjax, save_hf, save_wmjax, to_state_dict, unflatten_params)
from wmjax.convert.io import check_destination
from wmjax.convert.layout import ConversionError, hf_layout, hf_native_problem
from wmjax.tokenizer import find_tokenizer

__all__ = ["ConversionError", "load_hf", "save_hf", "to_state_dict", "from_state_dict", "save_wmjax", "load_wmjax",
           "detect_layout", "hf_layout", "hf_native_problem", "flatten_params", "unflatten_params", "convert",
           "check_destination", "WMJAX_CONFIG", "WMJAX_PARAMS"]


def convert(src_format: str, src: str, dst_format: str, dst: str, *, overwrite: bool = False, dtype=None,
            legacy="auto", progress: bool = False, tokenizer="auto", step=None):
    """Read `src` (format "hf" | "wmjax") and write `dst` (format "hf" | "wmjax"); returns the config.

    A "wmjax" source is a wmjax-native dir or a training run (`load_wmjax_source`; `step`: that step of the run).

    `dst` is checked (`check_destination`) before anything is read. tokenizer: a sentencepiece .model, a
    tokenizer.json or a directory holding either, written with the checkpoint (`save_hf`); "auto" = the one found
    with the source (its tokenizer.json / tokenizer.model), if any; None = none."""
    check_destination(dst, overwrite, sources=[src])
    src_tokenizer = None
    if src_format == "hf":
        config, params = load_hf(src, legacy=legacy, dtype=dtype, progress=progress)
    elif src_format == "wmjax":
        config, params, src_tokenizer = load_wmjax_source(src, step=step, dtype=dtype, progress=progress)
    else:
        raise ValueError(f"unknown source format {src_format!r} (expected 'hf' or 'wmjax')")
    if tokenizer == "auto":
        tokenizer = src if find_tokenizer(src) else src_tokenizer
    if dst_format == "hf":
        save_hf(config, params, dst, overwrite=overwrite, progress=progress, tokenizer=tokenizer)
    elif dst_format == "wmjax":
        save_wmjax(config, params, dst, overwrite=overwrite, progress=progress, tokenizer=tokenizer)
    else:
        raise ValueError(f"unknown destination format {dst_format!r} (expected 'hf' or 'wmjax')")
    return config


def load_wmjax_source(src: str, *, step=None, dtype=None, progress: bool = False):
    """(config, params, tokenizer path or None) of a wmjax-native dir (wmjax_config.json + params.safetensors) or
    of a training run: its dir, checkpoints/ dir or a step dir, newest good step unless `step`
    (`wmjax.checkpoint.load_run`: bad steps are moved aside, the previous one is used)."""
    if os.path.isfile(os.path.join(src, WMJAX_CONFIG)):
        if step is not None:
            raise ConversionError(f"{src}: a wmjax-native checkpoint has no steps (--step is for training runs)")
        return (*load_wmjax(src, dtype=dtype, progress=progress), None)
    try:
        run = load_run(src, step=step, log=lambda m: print(m, file=sys.stderr))
    except CheckpointError as e:
        raise ConversionError(f"{e}; nor is it a wmjax-native dir (no {WMJAX_CONFIG})" if os.path.isdir(src)
                              else str(e)) from None
    params = run.params if dtype is None else jax.tree_util.tree_map(lambda x: x.astype(dtype), run.params)
    return run.config, params, run.tokenizer
