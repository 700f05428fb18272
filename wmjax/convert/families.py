"""Each model family's upstream checkpoint format: its state-dict layout table and config translation.

    up = upstream_of(config)            # by the config's family (wmjax.models.registry)
    up = upstream_for_config_json(d)    # by an upstream config.json dict (model_type, then the family's test)

`layout(config)` lists every upstream tensor as an `Entry` (upstream key, wmjax param path, torch shape,
transpose); several keys may name one param (upstream modules sharing a tensor). The generic reader / writer
(`wmjax.convert.core`) does the rest, so a family adds a layout file and one record here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from wmjax.config import ConfigError
from wmjax.convert import layout as doge_layout
from wmjax.convert import layout_cheems, layout_om, layout_otce
from wmjax.models import registry

__all__ = ["Upstream", "UPSTREAMS", "upstream_of", "upstream_for_config_json"]


@dataclasses.dataclass(frozen=True)
class Upstream:
    """family: the wmjax family name. layout(config) -> [Entry]. model_type: the upstream config.json's
    model_type; matches(d) decides between families that share one (OTCE and Cheems both say "cheems").
    import_hook(config, refs, legacy) -> (config, refs): upstream quirks before the layout applies (Doge's legacy
    SmallDoge names); import_hint(config, found, legacy) -> a hint for a failed import; export_problem(config) ->
    None or why the config has no upstream equivalent. architecture: what loads the written checkpoint."""

    family: str
    layout: Callable
    model_type: str
    architecture: str = ""
    matches: Optional[Callable[[dict], bool]] = None
    import_hook: Optional[Callable] = None
    import_hint: Optional[Callable] = None
    export_problem: Optional[Callable] = None

    def is_config_json(self, d: dict) -> bool:
        if self.matches is not None:
            return bool(self.matches(d))
        return d.get("model_type") == self.model_type


UPSTREAMS: dict[str, Upstream] = {
    u.family: u for u in (
        # the first Cheems configs said model_type "doge" too: Cheems' have attn_layer_period
        Upstream("doge", doge_layout.hf_layout, "doge", "transformers.DogeForCausalLM",
                 matches=lambda d: d.get("model_type", "doge") == "doge" and "attn_layer_period" not in d,
                 import_hook=doge_layout.import_hook, import_hint=doge_layout.legacy_hint,
                 export_problem=doge_layout.hf_native_problem),
        Upstream("cheems", layout_cheems.layout, "cheems", "WonderfulMatrices CheemsForCausalLM",
                 matches=layout_cheems.matches, import_hook=layout_cheems.import_hook),
        # OTCE's config.json says model_type "cheems" too; its stage counts tell it from Cheems
        Upstream("otce", layout_otce.layout, "cheems", "LoserCheems/OTCE CheemsOTCEForCausalLM",
                 matches=lambda d: d.get("model_type") == "cheems" and "num_observation_layers" in d),
        Upstream("om", layout_om.layout, "om", "dingo-actual/om OmLLM", matches=layout_om.matches,
                 import_hook=layout_om.import_hook, export_problem=layout_om.export_problem),
    )
}


def upstream_of(config) -> Upstream:
    name = registry.family_of(config).name
    if name not in UPSTREAMS:
        raise ConfigError(f"model family {name!r} has no upstream checkpoint format registered")
    return UPSTREAMS[name]


def upstream_for_config_json(d: dict, source: str = "config.json") -> Upstream:
    hits = [u for u in UPSTREAMS.values() if u.is_config_json(d)]
    if len(hits) != 1:
        known = ", ".join(f"{u.family} ({u.model_type})" for u in UPSTREAMS.values())
        raise ConfigError(f"{source}: model_type={d.get('model_type')!r} matches "
                          f"{'no' if not hits else 'more than one'} wmjax model family; known: {known}")
    return hits[0]
