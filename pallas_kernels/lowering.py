"""`lower_once`: a kernel launcher whose equal calls lower (and compile) once per program.

jax lowers every pallas_call equation of a program on its own, and from jaxlib 0.10.3 on Pallas' Triton backend
compiles the kernel to PTX while lowering: a model whose 15 layers call the same kernels would compile each kernel
15 times (OTCE-160M's train step: 30 Triton compiles of the selective scan). Behind one `jax.jit` per set of static
arguments, equal calls trace to the same jaxpr, which jax lowers once (one function, called from every layer).
"""

from __future__ import annotations

import functools

import jax

__all__ = ["lower_once"]


def lower_once(launcher):
    """Decorator for a kernel launcher `launcher(*arrays, **static)`: positional arguments are arrays (or None),
    keyword arguments hashable static values (blocks, warps, flags, frozen configs)."""
    jitted = {}

    @functools.wraps(launcher)
    def call(*arrays, **static):
        key = tuple(sorted(static.items()))
        fn = jitted.get(key)
        if fn is None:
            fn = jitted[key] = jax.jit(functools.partial(launcher, **static))
        return fn(*arrays)

    return call
