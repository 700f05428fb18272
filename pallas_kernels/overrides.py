"""The one hook through which benchmarks change a kernel folder's tuned defaults (`pallas_kernels/<op>/tuning.py`).

    with pallas_kernels.ssd.tuning.override(block_t=32, num_stages_scan_fwd=3):
        f = jax.jit(...)          # traced here: the kernels read the overridden values

Values are read when a kernel call is traced, so jit a fresh function under each setting (a function traced
before the `with` keeps the values it was traced with).
"""

from __future__ import annotations

import contextlib
import dataclasses

__all__ = ["TunedDefaults"]


class TunedDefaults:
    """Field overrides for a frozen dataclass of tuned values (`cls`): `apply(base)` returns base (default: cls())
    with the fields set by the innermost active `override(**fields)` blocks."""

    def __init__(self, cls):
        self._cls = cls
        self._fields = {}

    def apply(self, base=None):
        base = self._cls() if base is None else base
        return dataclasses.replace(base, **self._fields) if self._fields else base

    @contextlib.contextmanager
    def override(self, **fields):
        names = {f.name for f in dataclasses.fields(self._cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"{self._cls.__name__} override: unknown field(s) {unknown}; fields are {sorted(names)}")
        previous = self._fields
        self._fields = {**previous, **fields}
        try:
            yield self.apply()
        finally:
            self._fields = previous
