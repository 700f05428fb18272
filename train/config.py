"""Training configuration: frozen dataclasses, YAML loading, ``--set a.b=c`` overrides, validation.

The whole run is described by one :class:`TrainConfig` tree::

    run_dir, seed
    model:      family (doge | cheems | otce | om; default doge) + preset + any field of that family's config
                (checked against the dataclass)
    data:       source (stdlib | text | jsonl | tokens), paths, seq_len, packing, tokenizer
    train:      steps, global batch, grad accumulation, dtypes, z-loss, logging, sampling
    optimizer:  AdamW + schedule (wsd | cosine | constant) + clipping
    mesh:       data / fsdp / tensor axis sizes (-1 = fill with the remaining devices)
    checkpoint: every N, keep K, async, resume

Every key is validated: an unknown key or a value of the wrong type is a :class:`ConfigError` naming the full
dotted path, the offending value and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from wmjax.config import ConfigError  # the project's one config error type (re-exported for train/)


@dataclass(frozen=True)
class TokenizerConfig:
    # Path to an existing sentencepiece ``.model``; if null, one is trained on ``corpus`` on first use and cached.
    path: Optional[str] = None
    vocab_size: int = 2048
    # Corpus used to train the tokenizer when ``path`` is null: "stdlib" or "data" (the run's own text files).
    corpus: str = "stdlib"
    max_corpus_bytes: int = 8_000_000
    model_type: str = "bpe"
    cache_dir: str = ".cache/wmjax/tokenizers"


@dataclass(frozen=True)
class DataConfig:
    # stdlib: the Python standard library's .py files (found through sysconfig); text: plain text files (one
    # document per file); jsonl: one JSON object per line with ``text_field``; tokens: numpy memmap token files
    # written by ``python -m train.prepare`` (documents separated by EOS).
    source: str = "stdlib"
    paths: tuple = ()
    text_field: str = "text"
    seq_len: int = 256
    # Attention stays within a packed document (segment ids) when the model supports it.
    segment_ids: bool = True
    shuffle: bool = True
    # Tokenized corpus cache (stdlib/text/jsonl sources are tokenized once and stored as a token file here).
    cache_dir: str = ".cache/wmjax/data"
    max_documents: int = 0  # 0 = all
    # Token ids that start / end each document in the token files (packing cuts documents at them). Default:
    # the token file's sidecar (``bos_id`` / ``eos_id``, written by ``python -m train.prepare``); a sidecar
    # without them needs these set. The model's bos/eos ids follow them.
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-3
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent in the final decay
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    every: int = 100
    keep: int = 3
    async_save: bool = True
    save_final: bool = True


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 400
    global_batch_size: int = 16
    grad_accum: int = 1
    compute_dtype: str = "auto"  # auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16
    param_dtype: str = "float32"
    z_loss: float = 0.0
    # Loss: fused (wmjax.ops.cross_entropy: LM head + f32 log-softmax per sequence chunk of ~loss_chunk_tokens
    # tokens, gradient computed in the forward pass; no [batch, seq, vocab] f32 logits), logits (the model's
    # logits, then the log-softmax), auto (= fused when the model supports it). Same function either way.
    loss_impl: str = "auto"
    loss_chunk_tokens: int = 8192
    # How DP/FSDP is expressed: gspmd (jit shardings only), shard_map (per-device model, explicit collectives;
    # dense models, mesh.tensor == 1), auto (shard_map when it applies and there are several devices).
    spmd: str = "auto"
    remat: bool = False  # rematerialise each decoder layer in the backward pass (less memory, ~1/3 more FLOPs)
    attention_impl: Optional[str] = None  # None = auto (Pallas kernel on GPU), "reference", "pallas"
    ssd_impl: Optional[str] = None  # Cheems' SSD scan: None = auto (Pallas kernels on GPU), "chunked", "pallas"
    scan_impl: Optional[str] = None  # OTCE's selective scan: None = auto (Pallas kernel on GPU), "reference", "pallas"
    log_every: int = 10
    progress: bool = True
    plot: bool = True
    tensorboard: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    resume: bool = False
    # ``model`` holds ``family`` (wmjax.models.registry; default doge), ``preset`` (one of the family's preset
    # names or null) and any field of the family's config; ``vocab_size:
    # tokenizer`` (the default) takes the vocabulary size from the tokenizer.
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")


# The embedded default: a tiny Doge on the Python standard library's own sources.  Tuned so that
# ``python -m train`` finishes in well under 5 minutes on a 2-core CPU (tokenizer training included).
# ``configs/tiny.yaml`` is this same tree written out.
DEFAULT_CONFIG: dict = {
    "run_dir": "runs/tiny",
    "seed": 0,
    "model": {
        "preset": None,
        "vocab_size": "tokenizer",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "keep_window_size": 2048,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
    "data": {
        "source": "stdlib",
        "seq_len": 128,
        "tokenizer": {"vocab_size": 2048, "corpus": "stdlib", "max_corpus_bytes": 6_000_000},
        "max_documents": 0,
    },
    "train": {"steps": 500, "global_batch_size": 16, "log_every": 10},
    "optimizer": {"lr": 3e-3, "warmup_steps": 40, "schedule": "wsd", "decay_fraction": 0.25},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "checkpoint": {"every": 100, "keep": 3},
}


# --------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with validation


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(value, tp, path: str):
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section '{path}', got {value!r}")
        return _from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is tuple:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(value)
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _from_dict(cls, d: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(_join(prefix, u)) for u in unknown)} in {where}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in d.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(cfg) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "model":
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k == "model":
            # A config file's model section replaces the default model wholesale when it names a preset;
            # otherwise it is merged field by field.
            # so does one that names another model family (the default's fields are Doge's).
            other_family = (v.get("family") or "doge") != (out[k].get("family") or "doge")
            out[k] = dict(v) if v.get("preset") or other_family else {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. optimizer.lr=3e-4), got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set: malformed key {key!r} in {item!r}")
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    d = _deepcopy(d)
    for item in overrides or []:
        parts, value = parse_override(item)
        node = d
        for p in parts[:-1]:
            if p not in node or node[p] is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {item}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return d


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None, base: Optional[dict] = None) -> TrainConfig:
    """Defaults (the embedded tiny run) <- YAML file <- ``--set`` overrides, then validate."""
    d = _deepcopy(base if base is not None else DEFAULT_CONFIG)
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        d = deep_merge(d, loaded)
    d = apply_overrides(d, overrides or [])
    cfg = _from_dict(TrainConfig, d)
    validate(cfg)
    return cfg


def config_from_dict(d: dict) -> TrainConfig:
    cfg = _from_dict(TrainConfig, d)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    d, t, o, m, c = cfg.data, cfg.train, cfg.optimizer, cfg.mesh, cfg.checkpoint
    need(d.source in ("stdlib", "text", "jsonl", "tokens"), f"data.source: expected stdlib|text|jsonl|tokens, got {d.source!r}")
    need(d.source == "stdlib" or d.paths, f"data.paths: required for data.source={d.source!r}")
    need(d.source != "stdlib" or not d.paths,
         f"data.paths is set ({', '.join(map(str, d.paths))}) but data.source is 'stdlib', which reads the Python "
         f"standard library and ignores data.paths: set data.source to tokens (files from python -m train.prepare), "
         f"text or jsonl")
    need(d.seq_len >= 2, f"data.seq_len: must be >= 2, got {d.seq_len}")
    need(d.tokenizer.vocab_size >= 16, f"data.tokenizer.vocab_size: must be >= 16, got {d.tokenizer.vocab_size}")
    need(d.tokenizer.corpus in ("stdlib", "data"), f"data.tokenizer.corpus: expected stdlib|data, got {d.tokenizer.corpus!r}")
    need(d.tokenizer.model_type in ("bpe", "unigram"), f"data.tokenizer.model_type: expected bpe|unigram, got {d.tokenizer.model_type!r}")
    need(t.steps >= 1, f"train.steps: must be >= 1, got {t.steps}")
    need(t.global_batch_size >= 1, f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum: must be >= 1, got {t.grad_accum}")
    need(t.global_batch_size % t.grad_accum == 0,
         f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    need(t.compute_dtype in ("auto", "float32", "bfloat16"), f"train.compute_dtype: expected auto|float32|bfloat16, got {t.compute_dtype!r}")
    need(t.param_dtype in ("float32", "bfloat16"), f"train.param_dtype: expected float32|bfloat16, got {t.param_dtype!r}")
    need(t.spmd in ("auto", "gspmd", "shard_map"), f"train.spmd: expected auto|gspmd|shard_map, got {t.spmd!r}")
    need(t.attention_impl in (None, "reference", "pallas"),
         f"train.attention_impl: expected null|reference|pallas, got {t.attention_impl!r}")
    need(t.ssd_impl in (None, "chunked", "pallas"), f"train.ssd_impl: expected null|chunked|pallas, got {t.ssd_impl!r}")
    need(t.scan_impl in (None, "reference", "pallas"),
         f"train.scan_impl: expected null|reference|pallas, got {t.scan_impl!r}")
    need(t.loss_impl in ("auto", "fused", "logits"),
         f"train.loss_impl: expected auto|fused|logits, got {t.loss_impl!r}")
    need(t.loss_chunk_tokens >= 1, f"train.loss_chunk_tokens: must be >= 1, got {t.loss_chunk_tokens}")
    need(t.z_loss >= 0, f"train.z_loss: must be >= 0, got {t.z_loss}")
    need(t.log_every >= 1, f"train.log_every: must be >= 1, got {t.log_every}")
    need(o.lr > 0, f"optimizer.lr: must be > 0, got {o.lr}")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1/b2: must be in [0, 1), got {o.b1}, {o.b2}")
    need(o.schedule in ("wsd", "cosine", "constant"), f"optimizer.schedule: expected wsd|cosine|constant, got {o.schedule!r}")
    need(o.warmup_steps >= 0, f"optimizer.warmup_steps: must be >= 0, got {o.warmup_steps}")
    need(0 <= o.decay_fraction <= 1, f"optimizer.decay_fraction: must be in [0, 1], got {o.decay_fraction}")
    need(0 <= o.min_lr_ratio <= 1, f"optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    need(o.clip_norm >= 0, f"optimizer.clip_norm: must be >= 0, got {o.clip_norm}")
    for name in ("data", "fsdp", "tensor"):
        v = getattr(m, name)
        need(v == -1 or v >= 1, f"mesh.{name}: must be -1 (fill) or >= 1, got {v}")
    need([m.data, m.fsdp, m.tensor].count(-1) <= 1, "mesh: at most one of data/fsdp/tensor may be -1")
    need(c.every >= 1, f"checkpoint.every: must be >= 1, got {c.every}")
    need(c.keep >= 1, f"checkpoint.keep: must be >= 1, got {c.keep}")
    model = dict(cfg.model)
    preset = model.pop("preset", None)
    need(preset is None or isinstance(preset, str), f"model.preset: expected a preset name or null, got {preset!r}")
    vs = model.get("vocab_size", "tokenizer")
    need(vs == "tokenizer" or (isinstance(vs, int) and vs > 0), f"model.vocab_size: expected an integer or 'tokenizer', got {vs!r}")


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
