"""The model of a run: the family's config from the ``model`` section and the data's special ids, compute dtypes.

``model.family`` names the model family (wmjax.models.registry: doge (default), cheems, otce, om);
``model.preset`` one of that family's published sizes; every other key is a field of the family's config."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import jax
import jax.numpy as jnp

from wmjax.config import ConfigError
from wmjax.models.registry import get_family


def build_model_config(model_section: dict, vocab_size: Optional[int] = None, special: Optional[dict] = None):
    """The model config of a run: ``model_section`` (family, preset, fields), ``vocab_size`` from the tokenizer
    when the section says 'tokenizer' (or gives neither a preset nor a size), ``special`` bos/eos/pad ids unless
    the section sets them."""
    fields = dict(model_section)
    preset = fields.pop("preset", None)
    family = get_family(fields.pop("family", "doge") or "doge")
    cls = family.config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model: unknown {cls.__name__} field(s) {', '.join('model.' + u for u in unknown)} "
                          f"(model.family={family.name}); known: {', '.join(sorted(known))}")
    if fields.get("vocab_size", None) == "tokenizer" or (not preset and "vocab_size" not in fields):
        if vocab_size is None:
            raise ConfigError("model.vocab_size is 'tokenizer' but no tokenizer is available")
        fields["vocab_size"] = vocab_size
    for k, v in (special or {}).items():
        fields.setdefault(k, v)
    try:
        if preset:
            return cls.preset(preset, **fields)
        return cls(**fields)
    except Exception as e:
        raise ConfigError(f"model: {e}") from None


def special_token_ids(ds, tok) -> dict:
    """The model's bos/eos/pad ids for a run from scratch: the data's document boundaries (``ds.bos_id`` /
    ``ds.eos_id``) and the tokenizer's pad (else the token files' ``pad_id``, else none). They replace a preset's
    ids (a preset names SmallDoge's tokenizer, not this run's); ``model.*_token_id`` set by the user win."""
    pad = tok.pad_id if tok is not None else ds.pad_id
    return {"bos_token_id": ds.bos_id, "eos_token_id": ds.eos_id, "pad_token_id": pad}


def check_special_token_ids(model_cfg, ds) -> None:
    """Refuse a pad id that is also a document boundary: the pad row of the embedding starts at zero, a document
    (or window) that starts with it has an all-zero hidden state in every layer (it attends only to itself), and
    RMSNorm's gradient at zero is 1/sqrt(rms_norm_eps) per norm: the gradient overflows with depth."""
    pad = model_cfg.pad_token_id
    for name, tid in (("bos", ds.bos_id), ("eos", ds.eos_id)):
        if pad is not None and pad == tid:
            raise ConfigError(
                f"model.pad_token_id={pad} is also the data's {name}_id: its embedding row is initialised to zero, "
                f"and a document starting with it makes the gradient overflow with depth; set model.pad_token_id "
                f"to an id the data does not use, or null")


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu", "cuda", "rocm") else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def model_accepts(model_cls, arg: str) -> bool:
    try:
        return arg in inspect.signature(model_cls.__call__).parameters
    except (TypeError, ValueError):
        return False
