"""`--xla-options` of the bench scripts: XLA option sets compared in one process (jax compiler_options).

    xla_option_sets(";xla_gpu_enable_command_buffer=")
        -> [("", {}), ("xla_gpu_enable_command_buffer=", {"xla_gpu_enable_command_buffer": ""})]

Sets are ';'-separated, each 'name=value name=value' (values may hold commas); an empty set = XLA's defaults.
"""

from __future__ import annotations


def xla_option_sets(spec: str):
    """spec -> [(label, {name: value})], one per ';'-separated set, in order (label = the set's text)."""
    out = []
    for text in spec.split(";"):
        pairs = text.split()
        bad = [p for p in pairs if "=" not in p]
        if bad:
            raise ValueError(f"--xla-options: {bad[0]!r} is not name=value (sets are ';'-separated)")
        out.append((text.strip(), dict(p.split("=", 1) for p in pairs)))
    return out
