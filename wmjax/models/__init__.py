"""The model families (wmjax.models.registry): each family module ends with its `FAMILY` record."""

from wmjax.models import cheems, doge, om, otce
from wmjax.models.registry import FAMILIES, Family, family_of, get_family, register

register(doge.FAMILY)
register(cheems.FAMILY)
register(otce.FAMILY)
register(om.FAMILY)

__all__ = ["FAMILIES", "Family", "family_of", "get_family", "register"]
