"""Fast compilation of random parameter inits on GPU.

jax lowers the threefry2x32 PRNG on GPU as an unrolled HLO function (20 rounds of add / rotate / xor per call),
which XLA:GPU compiles into every random draw's fusion (XLA:CPU lowers it as a rolled loop); Doge-160M's init
compiled for about a minute on an H100 (docs/benchmarks-history.md, Training). jax's
`jax_threefry_gpu_kernel_lowering` option lowers threefry on GPU to one precompiled kernel instead: the same
threefry function, so the same random bits.

    with fast_random_compile():
        params = jax.jit(init)(rng)      # the option is read when the jit lowers (it is part of the jit cache key)
"""

from __future__ import annotations

import contextlib

try:  # jax's private config module holds the option's context manager
    from jax._src import config as _jax_config
except ImportError:  # pragma: no cover - a jax without it
    _jax_config = None

__all__ = ["fast_random_compile"]


def fast_random_compile():
    """Context manager: lower threefry to jax's GPU kernel inside (no effect on CPU / TPU lowering); a null
    context on a jax without the option."""
    flag = getattr(_jax_config, "threefry_gpu_kernel_lowering", None)
    if flag is None:  # pragma: no cover - older / newer jax without the option
        return contextlib.nullcontext()
    return flag(True)
