"""Upstream (HF / PyTorch) <-> wmjax conversion and the wmjax-native checkpoint format, for every model family.

A family's upstream layout is its `layout(config)` table (wmjax.convert.families): each entry names one upstream
tensor and the param it is (several upstream keys may name one param: upstream modules that share a tensor, such
as OTCE's shared expert under every expert; reading checks that the copies agree, writing writes every copy).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from wmjax.config import ConfigError
from wmjax.convert.io import (TensorRef, atomic_directory, check_destination, hf_weight_files, in_memory_tensors,
                              open_safetensors, open_torch_bin, read_json, to_numpy)
from wmjax.convert.layout import ConversionError, Entry, check_tensors, detect_layout, flat_param_shapes
from wmjax.convert.families import upstream_for_config_json, upstream_of
from wmjax.models import registry
from wmjax.convert.tokenizer import tokenizer_files

__all__ = ["load_hf", "save_hf", "to_state_dict", "from_state_dict", "save_wmjax", "load_wmjax", "detect_layout",
           "flatten_params", "unflatten_params", "WMJAX_CONFIG", "WMJAX_PARAMS"]

WMJAX_CONFIG = "wmjax_config.json"
WMJAX_PARAMS = "params.safetensors"
_WMJAX_FORMAT = "wmjax"
_WMJAX_FORMATS_READ = ("wmjax", "wmjax-doge")  # "wmjax-doge": written before the model families
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


def _layout(config) -> tuple[Any, list[Entry]]:
    up = upstream_of(config)
    return up, up.layout(config)


def _embedding_entry(config, layout: list[Entry]) -> Optional[Entry]:
    """The input embedding's entry ([vocab, hidden], not transposed), for a tied head written by upstream."""
    for e in layout:
        if e.path[-1] == "embedding" and e.hf_shape == (config.vocab_size, config.hidden_size):
            return e
    return None


def _apply_import_hook(family, config, refs, legacy):
    if family.import_hook is None:
        return config, refs
    return family.import_hook(config, refs, legacy)


def _params_from_refs(config, refs: dict[str, TensorRef], *, legacy: Legacy, source: str, dtype=None,
                      progress: bool = False) -> dict:
    family, layout = _layout(config)
    expected = {e.hf_key: e.hf_shape for e in layout}
    found = {k: (r.shape, r.file) for k, r in refs.items()}
    tied_head, emb_entry = None, _embedding_entry(config, layout)
    if config.tie_word_embeddings and "lm_head.weight" in found and emb_entry is not None:
        # upstream state_dict() includes the tied head (shared storage); accept it if it is the embedding table
        tied_head = refs["lm_head.weight"]
        expected = dict(expected, **{"lm_head.weight": (config.vocab_size, config.hidden_size)})
    hint = family.import_hint(config, found, legacy) if family.import_hint is not None else ""
    check_tensors(expected, found, what=f"{source}: tensors do not match the config", hint=hint)
    flat, first_key = {}, {}
    for e in tqdm(layout, desc="reading tensors", unit="tensor", disable=not progress):
        a = refs[e.hf_key].load()
        if tuple(a.shape) != e.hf_shape:  # a lying header; cannot happen with safetensors, cheap to check
            raise ConversionError(f"{source}: {e.hf_key}: expected {e.hf_shape}, read {tuple(a.shape)}")
        a = _as_param(a.T if e.transpose else a, dtype)
        if e.flat_path in flat:  # another upstream name of the same (shared) tensor: the copies must agree
            if not np.array_equal(np.asarray(a, np.float32), np.asarray(flat[e.flat_path], np.float32)):
                raise ConversionError(f"{source}: {e.hf_key} and {first_key[e.flat_path]} are copies of one shared "
                                      f"tensor ({e.flat_path}) but differ")
            continue
        flat[e.flat_path], first_key[e.flat_path] = a, e.hf_key
    if tied_head is not None:
        head = tied_head.load()
        emb = np.asarray(flat[emb_entry.flat_path])
        if not np.array_equal(np.asarray(head, np.float32), np.asarray(emb, np.float32)):
            raise ConversionError(
                f"{source}: tie_word_embeddings=True but lm_head.weight differs from {emb_entry.hf_key} "
                f"({tied_head.file or 'state dict'}); set tie_word_embeddings=False in the config to keep both")
    return unflatten_params(flat)


def from_state_dict(config, state_dict: Mapping[str, Any], *, legacy: Legacy = "auto", dtype=None,
                    source: str = "state dict") -> dict:
    """Upstream state dict (torch tensors, numpy or jax arrays) -> wmjax params for exactly `config` (Doge: HF or
    legacy key names; the layout flags are not changed here, `load_hf` detects them). dtype=None keeps the
    tensors' dtype."""
    _check_legacy_arg(legacy)
    _, refs = _apply_import_hook(upstream_of(config), config, in_memory_tensors(state_dict), legacy)
    return _params_from_refs(config, refs, legacy=legacy, source=source, dtype=dtype)


def to_state_dict(config, params: Mapping, *, include_tied_head: bool = False,
                  progress: bool = False) -> dict[str, np.ndarray]:
    """wmjax params -> upstream state dict of contiguous numpy arrays (dtype kept; tied `lm_head.weight` omitted
    unless include_tied_head; a shared tensor written under each of its upstream names). Missing / unexpected /
    mis-shaped params raise one error listing all of them."""
    flat = flatten_params(params)
    _, layout = _layout(config)
    check_tensors(flat_param_shapes(layout), {k: (tuple(np.shape(v)), None) for k, v in flat.items()},
                  what="params do not match the config")
    sd = {}
    for e in tqdm(layout, desc="converting tensors", unit="tensor", disable=not progress):
        a = to_numpy(flat[e.flat_path])
        sd[e.hf_key] = np.ascontiguousarray(a.T if e.transpose else a)
    emb_entry = _embedding_entry(config, layout)
    if include_tied_head and config.tie_word_embeddings and emb_entry is not None:
        sd["lm_head.weight"] = sd[emb_entry.hf_key]
    return sd


def _config_from_upstream(d: dict, source: str, overrides: dict):
    family = registry.get_family(upstream_for_config_json(d, source).family)
    try:
        return family.config_cls.from_upstream_dict(d, **overrides)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def load_hf(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]], *, config=None, legacy: Legacy = "auto",
            dtype=None, progress: bool = False, **config_overrides) -> tuple[Any, dict]:
    """Read an upstream checkpoint (transformers Doge, or a Cheems / OTCE / Om PyTorch checkpoint) ->
    (config, params). The family comes from the config (its class, or config.json's model_type).

    `path_or_state_dict`: a model directory (config.json + model.safetensors / pytorch_model.bin / their sharded
    `*.index.json`), a single .safetensors / .bin file (needs `config`), or an in-memory state dict (needs `config`).
    `config`: a wmjax config, or an upstream config dict; read from the directory's config.json when None.
    `legacy` (Doge): "auto"/True accept the pre-2025-06-19 SmallDoge key names and detect the legacy layouts (no
    q/k norm -> qk_norm=False; A/dt_proj by query heads -> dt_heads="query"); False accepts only the HF-native
    layout of the config (as transformers does). dtype=None keeps the checkpoint dtype (bf16 stays bf16).
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
                    cfile = os.path.join(path, "config.json")
                    if not os.path.isfile(cfile):
                        raise ConfigError(f"{cfile}: no config.json")
                    config = _config_from_upstream(read_json(cfile, "config.json"), cfile, config_overrides)
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
            raise ConversionError(f"{source}: no config given (pass config=<a wmjax config> or an upstream config "
                                  "dict)")
        if isinstance(config, Mapping):
            config = _config_from_upstream(dict(config), "config", config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        config, refs = _apply_import_hook(upstream_of(config), config, refs, legacy)
        params = _params_from_refs(config, refs, legacy=legacy, source=source, dtype=dtype, progress=progress)
    return config, params


def _dtype_name(params) -> str:
    dts = {np.dtype(to_numpy(v).dtype).name for v in flatten_params(params).values()}
    return dts.pop() if len(dts) == 1 else "float32"


def _write_files(directory: str, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def save_hf(config, params: Mapping, path: Union[str, os.PathLike], *, overwrite: bool = False,
            progress: bool = False, tokenizer: Optional[Union[str, os.PathLike]] = None) -> None:
    """Write `config.json` + `model.safetensors` in the family's upstream layout: for Doge, what
    `transformers.DogeForCausalLM.from_pretrained` loads with no missing / unexpected keys (tied `lm_head.weight`
    omitted, as HF's save_pretrained does). With `tokenizer` (a sentencepiece .model, a tokenizer.json or a
    directory holding either) also the tokenizer files `transformers.AutoTokenizer.from_pretrained` loads
    (`wmjax.convert.tokenizer`). The destination is checked first; atomic: written to a temp dir next to `path`,
    then renamed; on failure `path` is untouched. A config with no upstream equivalent (Doge's legacy layouts)
    raises a ConversionError saying why (use save_wmjax)."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    up = upstream_of(config)
    problem = up.export_problem(config) if up.export_problem is not None else None
    if problem:
        raise ConversionError(f"{path}: cannot write an upstream ({up.family}) checkpoint: {problem}")
    up_cfg = config.to_upstream_dict()
    up_cfg["dtype"] = _dtype_name(params)
    tok_files = tokenizer_files(tokenizer, config) if tokenizer is not None else {}
    sd = to_state_dict(config, params, progress=progress)
    with atomic_directory(path, overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(up_cfg, f, indent=2, sort_keys=True)
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_files(tmp, tok_files)


# ----------------------------------------------------------------------------------------------------- wmjax native
def save_wmjax(config, params: Mapping, path: Union[str, os.PathLike], *, overwrite: bool = False,
               progress: bool = False, tokenizer: Optional[Union[str, os.PathLike]] = None) -> None:
    """wmjax-native checkpoint: `wmjax_config.json` (the family and every config field, layout flags included) +
    `params.safetensors` ('/'-joined param paths, dtypes kept) + the tokenizer files of `tokenizer`, as save_hf
    writes them. Checked first and atomic like save_hf."""
    path = os.fspath(path)
    check_destination(path, overwrite)
    flat = flatten_params(params)
    family, layout = _layout(config)
    check_tensors(flat_param_shapes(layout), {k: (tuple(np.shape(v)), None) for k, v in flat.items()},
                  what="params do not match the config")
    tok_files = tokenizer_files(tokenizer, config) if tokenizer is not None else {}
    arrays = {k: np.ascontiguousarray(to_numpy(v))
              for k, v in tqdm(flat.items(), desc="gathering tensors", unit="tensor", disable=not progress)}
    with atomic_directory(path, overwrite) as tmp:
        with open(os.path.join(tmp, WMJAX_CONFIG), "w") as f:
            json.dump({"format": _WMJAX_FORMAT, "format_version": _WMJAX_FORMAT_VERSION, "model_type": family.family,
                       "config": config.to_dict()}, f, indent=2, sort_keys=True)
        save_file(arrays, os.path.join(tmp, WMJAX_PARAMS), metadata={"format": _WMJAX_FORMAT})
        _write_files(tmp, tok_files)


def load_wmjax(path: Union[str, os.PathLike], *, dtype=None, progress: bool = False) -> tuple[Any, dict]:
    path = os.fspath(path)
    cfile = os.path.join(path, WMJAX_CONFIG)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: not a directory")
    meta = read_json(cfile, "wmjax config")
    if not isinstance(meta, dict) or meta.get("format") not in _WMJAX_FORMATS_READ or not isinstance(meta.get("config"), dict):
        raise ConversionError(f"{cfile}: not a wmjax checkpoint config (expected format={_WMJAX_FORMAT!r} and a "
                              "'config' object)")
    if meta.get("format_version") != _WMJAX_FORMAT_VERSION:
        raise ConversionError(f"{cfile}: format_version={meta.get('format_version')!r}, this wmjax reads "
                              f"{_WMJAX_FORMAT_VERSION}")
    try:
        config = registry.get_family(meta.get("model_type", "doge")).config_cls.from_dict(meta["config"])
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{cfile}: {e}") from None
    pfile = os.path.join(path, WMJAX_PARAMS)
    if not os.path.exists(pfile):
        raise ConversionError(f"{pfile}: file not found")
    with contextlib.ExitStack() as stack:
        refs = open_safetensors(pfile, stack)
        expected = flat_param_shapes(_layout(config)[1])
        check_tensors(expected, {k: (r.shape, r.file) for k, r in refs.items()},
                      what=f"{path}: tensors do not match the config")
        flat = {k: _as_param(refs[k].load(), dtype)
                for k in tqdm(expected, desc="reading tensors", unit="tensor", disable=not progress)}
    return config, unflatten_params(flat)
