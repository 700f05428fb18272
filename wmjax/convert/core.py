"""HF <-> wmjax conversion and the wmjax-native checkpoint format."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from wmjax.config import ConfigError, DogeConfig
from wmjax.convert.io import (TensorRef, atomic_directory, check_destination, hf_weight_files, in_memory_tensors,
                              open_safetensors, open_torch_bin, read_json, to_numpy)
from wmjax.convert.layout import (DROPPED_KEY_PATTERN, IGNORED_KEY_PATTERNS, ConversionError, check_tensors,
                                  flat_param_shapes, hf_layout, hf_native_problem, rename_legacy_keys)
from wmjax.convert.tokenizer import tokenizer_files

__all__ = ["load_hf", "save_hf", "to_state_dict", "from_state_dict", "save_wmjax", "load_wmjax", "detect_layout",
           "flatten_params", "unflatten_params", "WMJAX_CONFIG", "WMJAX_PARAMS"]

WMJAX_CONFIG = "wmjax_config.json"
WMJAX_PARAMS = "params.safetensors"
_WMJAX_FORMAT = "wmjax-doge"
_WMJAX_FORMAT_VERSION = 1

Legacy = Union[bool, str]  # "auto" | True (accept legacy names/layouts, detect) | False (HF-native only)


def _check_legacy_arg(legacy):
    if legacy not in ("auto", True, False):
        raise ValueError(f"legacy={legacy!r}: expected 'auto', True or False")


# ----------------------------------------------------------------------------------------------------- pytrees
def flatten_params(params: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key))
        else:
            out[key] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        d = out
        *parents, last = key.split("/")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _as_param(a: np.ndarray, dtype):
    a = np.ascontiguousarray(a)
    return jnp.asarray(a if dtype is None else a.astype(dtype))


# ----------------------------------------------------------------------------------------------------- HF state dicts
def _normalize_keys(refs: dict[str, TensorRef], legacy: Legacy) -> dict[str, TensorRef]:
    """Drop ignorable keys, rename legacy keys (unless legacy=False), drop router_gate.bias (warn if non-zero)."""
    refs = {k: r for k, r in refs.items() if not any(p.search(k) for p in IGNORED_KEY_PATTERNS)}
    if legacy is False:
        return refs
    names = rename_legacy_keys(refs)
    out = {}
    for new, old in names.items():
        if DROPPED_KEY_PATTERN.match(new):
            b = refs[old].load()
            if np.any(np.asarray(b, np.float32) != 0):
                warnings.warn(f"dropping non-zero legacy {old} (max |b| = {np.abs(np.asarray(b, np.float32)).max():.3g})"
                              ": the current CDMoE router has no bias (docs/DOGE.md, CDMoE), as in the official "
                              "converters; outputs will differ from the original model", stacklevel=3)
            continue
        out[new] = refs[old]
    return out


def detect_layout(config: DogeConfig, keys_shapes: Mapping[str, tuple]) -> DogeConfig:
    """`config` with `qk_norm` / `dt_heads` set from the tensors (HF-normalized names): q/k norm present or not,
    `A` sized by query heads (-> dt_heads='query' when H != G; when H == G both layouts are the same tensors and
    the HF-native 'kv' is kept unless the config already says 'query')."""
    changes: dict[str, Any] = {}
    qk = any(k.endswith(".self_attn.q_norm.weight") or k.endswith(".self_attn.k_norm.weight") for k in keys_shapes)
    if qk != config.qk_norm:
        changes["qk_norm"] = qk
    H, G = config.num_attention_heads, config.num_key_value_heads
    a = keys_shapes.get("model.layers.0.self_attn.A")
    if a is not None and H != G and len(a) == 1:
        if a[0] == H and config.dt_heads != "query":
            changes["dt_heads"] = "query"
        elif a[0] == G and config.dt_heads != "kv":
            changes["dt_heads"] = "kv"
    return config.replace(**changes) if changes else config


def _legacy_hint(config: DogeConfig, found: Mapping[str, Any], legacy: Legacy) -> str:
    hints = []
    if legacy is False:
        old = [k for k in found if rename_legacy_keys([k]).popitem()[0] != k][:3]
        if old:
            hints.append(f"keys such as {old} are pre-2025-06-19 SmallDoge names: load with legacy='auto' to rename "
                         "them")
        if config.qk_norm and not any(k.endswith("q_norm.weight") for k in found):
            hints.append("no q_norm/k_norm tensors: a legacy SmallDoge layout (qk_norm=False), load with "
                         "legacy='auto'")
    return ("hint: " + "; ".join(hints)) if hints else ""


def _params_from_refs(config: DogeConfig, refs: dict[str, TensorRef], *, legacy: Legacy, source: str,
                      dtype=None, progress: bool = False) -> dict:
    layout = hf_layout(config)
    expected = {e.hf_key: e.hf_shape for e in layout}
    found = {k: (r.shape, r.file) for k, r in refs.items()}
    tied_head = None
    if config.tie_word_embeddings and "lm_head.weight" in found:
        # HF's state_dict() includes the tied head (shared storage); accept it if it is the embedding table
        tied_head = refs["lm_head.weight"]
        expected = dict(expected, **{"lm_head.weight": (config.vocab_size, config.hidden_size)})
    check_tensors(expected, found, what=f"{source}: tensors do not match the config", hint=_legacy_hint(
        config, found, legacy))
    flat = {}
    for e in tqdm(layout, desc="reading tensors", unit="tensor", disable=not progress):
        a = refs[e.hf_key].load()
        if tuple(a.shape) != e.hf_shape:  # a lying header; cannot happen with safetensors, cheap to check
            raise ConversionError(f"{source}: {e.hf_key}: expected {e.hf_shape}, read {tuple(a.shape)}")
        flat[e.flat_path] = _as_param(a.T if e.transpose else a, dtype)
    if tied_head is not None:
        head = tied_head.load()
        emb = np.asarray(flat["model/embed_tokens/embedding"])
        if not np.array_equal(np.asarray(head, np.float32), np.asarray(emb, np.float32)):
            raise ConversionError(
                f"{source}: tie_word_embeddings=True but lm_head.weight differs from model.embed_tokens.weight "
                f"({tied_head.file or 'state dict'}); set tie_word_embeddings=False in the config to keep both")
    return unflatten_params(flat)


def from_state_dict(config: DogeConfig, state_dict: Mapping[str, Any], *, legacy: Legacy = "auto", dtype=None,
                    source: str = "state dict") -> dict:
    """HF-format state dict (torch tensors, numpy or jax arrays; HF or legacy key names) -> wmjax params for exactly
    `config` (the layout flags are not changed here; `load_hf` detects them). dtype=None keeps the tensors' dtype."""
    _check_legacy_arg(legacy)
    refs = _normalize_keys(in_memory_tensors(state_dict), legacy)
    return _params_from_refs(config, refs, legacy=legacy, source=source, dtype=dtype)


def to_state_dict(config: DogeConfig, params: Mapping, *, include_tied_head: bool = False,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """wmjax params -> HF state dict of contiguous numpy arrays (dtype kept; tied `lm_head.weight` omitted unless
    include_tied_head). Missing / unexpected / mis-shaped params raise one error listing all of them."""
    flat = flatten_params(params)
    layout = hf_layout(config)
    check_tensors({e.flat_path: e.flax_shape for e in layout},
                  {k: (tuple(np.shape(v)), None) for k, v in flat.items()},
                  what="params do not match the config")
    sd = {}
    for e in tqdm(layout, desc="converting tensors", unit="tensor", disable=not progress):
        a = to_numpy(flat[e.flat_path])
        sd[e.hf_key] = np.ascontiguousarray(a.T if e.transpose else a)
    if include_tied_head and config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def load_hf(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]], *, config: Optional[DogeConfig] = None,
            legacy: Legacy = "auto", dtype=None, progress: bool = False, **config_overrides
            ) -> tuple[DogeConfig, dict]:
    """Read a HF Doge checkpoint -> (config, params).

    `path_or_state_dict`: a model directory (config.json + model.safetensors / pytorch_model.bin / their sharded
    `*.index.json`), a single .safetensors / .bin file (needs `config`), or an in-memory state dict (needs `config`).
    `config`: a DogeConfig, or a HF config dict; read from the directory's config.json when None.
    `legacy`: "auto"/True accept the pre-2025-06-19 SmallDoge key names and detect the legacy layouts (no q/k norm ->
    qk_norm=False; A/dt_proj by query heads -> dt_heads="query"); False accepts only the HF-native layout of the
    config (as transformers does). dtype=None keeps the checkpoint dtype (bf16 stays bf16).
    """
    _check_legacy_arg(legacy)
    with contextlib.ExitStack() as stack:
        if isinstance(path_or_state_dict, Mapping):
            source = "state dict"
            refs = in_memory_tensors(path_or_state_dict)
        else:
            path = os.fspath(path_or_state_dict)
            source = path
            if os.path.isdir(path):
                if config is None:
                    config = DogeConfig.from_hf_json(path, **config_overrides)
                    config_overrides = {}
                kind, files = hf_weight_files(path)
            elif os.path.isfile(path):
                kind = "safetensors" if path.endswith(".safetensors") else "bin"
                files = [(path, None)]
            else:
                raise ConversionError(f"{path}: no such file or directory")
            refs = {}
            for f, keys in files:
                part = open_safetensors(f, stack, keys) if kind == "safetensors" else open_torch_bin(f)
                dup = sorted(set(part) & set(refs))
                if dup:
                    raise ConversionError(f"{f}: tensor(s) also present in another shard: {dup}")
                refs.update(part)
        if config is None:
            raise ConversionError(f"{source}: no config given (pass config=DogeConfig(...) or a HF config dict)")
        if isinstance(config, Mapping):
            config = DogeConfig.from_hf_dict(dict(config), **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        refs = _normalize_keys(refs, legacy)
        if legacy is not False:
            config = detect_layout(config, {k: r.shape for k, r in refs.items()})
        params = _params_from_refs(config, refs, legacy=legacy, source=source, dtype=dtype, progress=progress)
    return config, params


def _dtype_name(params) -> str:
    dts = {np.dtype(to_numpy(v).dtype).name for v in flatten_params(params).values()}
    return dts.pop() if len(dts) == 1 else "float32"


def _write_files(directory: str, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def save_hf(config: DogeConfig, params: Mapping, path: Union[str, os.PathLike], *, overwrite: bool = False,
            progress: bool = False, tokenizer: Optional[Union[str, os.PathLike]] = None) -> None:
    """Write `config.json` + `model.safetensors` that `transformers.DogeForCausalLM.from_pretrained` loads with no
    missing / unexpected keys (tied `lm_head.weight` omitted, as HF's save_pretrained does), and with `tokenizer`
    (a sentencepiece .model, a tokenizer.json or a directory holding either) the tokenizer files that
    `transformers.AutoTokenizer.from_pretrained` loads (`wmjax.convert.tokenizer`). The destination is checked
    first; atomic: written to a temp dir next to `path`, then renamed; on failure `path` is untouched. Legacy
    layouts with no HF-native equivalent raise a ConversionError saying why (use save_wmjax)."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    problem = hf_native_problem(config)
    if problem:
        raise ConversionError(f"{path}: cannot write a transformers checkpoint: {problem}")
    if config.dt_heads == "query":  # H == G: the same tensors; write the HF-native flag
        config = config.replace(dt_heads="kv")
    hf_cfg = config.to_hf_dict()
    hf_cfg["dtype"] = _dtype_name(params)
    if config.router_layout != "hf" and config.is_moe:
        # transformers keeps unknown config.json keys as plain attributes (and ignores this one); load_hf reads it back
        hf_cfg["router_layout"] = config.router_layout
        warnings.warn("router_layout='per_token': transformers ignores this and routes with its view(2, N, K) "
                      "layout (docs/DOGE.md, CDMoE router layout), so its outputs differ from wmjax's for N > 1 "
                      "tokens; wmjax.convert.load_hf reads the layout back from config.json", stacklevel=2)
    tok_files = tokenizer_files(tokenizer, config) if tokenizer is not None else {}
    sd = to_state_dict(config, params, progress=progress)
    with atomic_directory(path, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_files(tmp, tok_files)


# ----------------------------------------------------------------------------------------------------- wmjax native
def save_wmjax(config: DogeConfig, params: Mapping, path: Union[str, os.PathLike], *, overwrite: bool = False,
               progress: bool = False, tokenizer: Optional[Union[str, os.PathLike]] = None) -> None:
    """wmjax-native checkpoint: `wmjax_config.json` (every DogeConfig field, layout flags included) +
    `params.safetensors` ('/'-joined param paths, dtypes kept) + the tokenizer files of `tokenizer`, as save_hf
    writes them. Checked first and atomic like save_hf."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    flat = flatten_params(params)
    check_tensors(flat_param_shapes(config), {k: (tuple(np.shape(v)), None) for k, v in flat.items()},
                  what="params do not match the config")
    tok_files = tokenizer_files(tokenizer, config) if tokenizer is not None else {}
    arrays = {k: np.ascontiguousarray(to_numpy(v))
              for k, v in tqdm(flat.items(), desc="gathering tensors", unit="tensor", disable=not progress)}
    with atomic_directory(path, overwrite) as tmp:
        with open(os.path.join(tmp, WMJAX_CONFIG), "w") as f:
            json.dump({"format": _WMJAX_FORMAT, "format_version": _WMJAX_FORMAT_VERSION, "model_type": "doge",
                       "config": config.to_dict()}, f, indent=2, sort_keys=True)
        save_file(arrays, os.path.join(tmp, WMJAX_PARAMS), metadata={"format": _WMJAX_FORMAT})
        _write_files(tmp, tok_files)


def load_wmjax(path: Union[str, os.PathLike], *, dtype=None, progress: bool = False) -> tuple[DogeConfig, dict]:
    path = os.fspath(path)
    cfile = os.path.join(path, WMJAX_CONFIG)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory")
    meta = read_json(cfile, "wmjax config")
    if not isinstance(meta, dict) or meta.get("format") != _WMJAX_FORMAT or not isinstance(meta.get("config"), dict):
        raise ConversionError(f"{cfile}: not a wmjax checkpoint config (expected format={_WMJAX_FORMAT!r} and a "
                              "'config' object)")
    if meta.get("format_version") != _WMJAX_FORMAT_VERSION:
        raise ConversionError(f"{cfile}: format_version={meta.get('format_version')!r}, this wmjax reads "
                              f"{_WMJAX_FORMAT_VERSION}")
    try:
        config = DogeConfig.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cfile}: {e}") from None
    pfile = os.path.join(path, WMJAX_PARAMS)
    if not os.path.exists(pfile):
        raise ConversionError(f"{pfile}: file not found")
    with contextlib.ExitStack() as stack:
        refs = open_safetensors(pfile, stack)
        expected = flat_param_shapes(config)
        check_tensors(expected, {k: (r.shape, r.file) for k, r in refs.items()},
                      what=f"{path}: tensors do not match the config")
        flat = {k: _as_param(refs[k].load(), dtype)
                for k in tqdm(expected, desc="reading tensors", unit="tensor", disable=not progress)}
    return config, unflatten_params(flat)
