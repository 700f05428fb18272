"""Model families: what the trainer, the sampler, the converter and the checkpoint reader need of a model.

    family = family_of(config)            # by the config's class
    family = get_family("cheems")         # by name (a checkpoint's meta, a YAML's model.family)
    family = family_for_upstream(d)       # by an upstream config.json dict

A family is one `Family` record (defined at the bottom of its model module, registered in
`wmjax/models/__init__.py`), so the entry points take a family through this table and grow no per-family
branches. The upstream conversion of a family (its state-dict layout table) is registered on the converter's side,
`wmjax.convert.families`, so the model library never imports the converter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from wmjax.cache import init_cache as _default_init_cache
from wmjax.config import ConfigError

__all__ = ["Family", "FAMILIES", "register", "family_of", "get_family", "family_names"]


@dataclasses.dataclass(frozen=True)
class Family:
    """name: "doge" | "cheems" | "otce" | "om".
    config_cls: frozen dataclass config (from_dict / to_dict / preset / replace / from_upstream_dict /
        to_upstream_dict). model_cls(config, dtype=, param_dtype=, remat=, [attention_impl=]) is the Flax module:
        ``logits, cache = model.apply({"params": p}, ids [b, s], positions, cache, attention_mask, segment_ids)``.
    init_params(config, rng, param_dtype) -> params; param_logical_axes(config) -> logical axis names per param.
    init_cache(config, batch, max_length, dtype, kind, multiple_of) -> the model's decode cache.
    describe(config) -> a short line for logs.
    """

    name: str
    config_cls: type
    model_cls: type
    init_params: Callable
    param_logical_axes: Callable
    init_cache: Callable = _default_init_cache
    describe: Optional[Callable[[Any], str]] = None

    def summary(self, config) -> str:
        if self.describe is not None:
            return self.describe(config)
        return f"{config.num_hidden_layers} layers, d={config.hidden_size}, vocab={config.vocab_size}"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(family_names())}")
    return FAMILIES[name]


def family_of(config) -> Family:
    for f in FAMILIES.values():
        if type(config) is f.config_cls:
            return f
    raise ConfigError(f"{type(config).__name__} is not the config of a registered model family "
                      f"({', '.join(family_names())})")
