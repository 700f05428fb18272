"""Fast compilation of random parameter inits on GPU.

jax lowers the threefry2x32 PRNG on GPU as an unrolled HLO function (20 rounds of add / rotate / xor per call),
which XLA:GPU compiles into every random draw's fusion. Doge-160M's init (`wmjax.models.doge.init_params`, ~30
draws after the vmapped layer init) spent over 45-60 s in XLA:GPU's compile on an H100 (jax 0.11.2; stack dumps
in `bench/sample.py` / `bench/train.py --traceback-after`, docs/BENCHMARKS.md), against ~8 s on XLA:CPU, which lowers
threefry as a rolled loop. jax's `jax_threefry_gpu_kernel_lowering` option lowers threefry on GPU to one
precompiled kernel instead (jax: "makes compile times faster at a potential runtime memory cost"): the same
threefry function, so the same random bits.

    with fast_random_compile():
        params = jax.jit(init)(rng)      # the option is read when the jit lowers (it is part of the jit cache key)
"""

from __future__ import annotations

import contextlib

__all__ = ["fast_random_compile"]


def fast_random_compile():
    """Context manager: lower threefry to jax's GPU kernel inside (no effect on CPU / TPU lowering); a null
    context on a jax without the option."""
    try:
        from jax._src import config as jax_config
        flag = jax_config.threefry_gpu_kernel_lowering
    except (ImportError, AttributeError):  # pragma: no cover - older / newer jax without the option
        return contextlib.nullcontext()
    return flag(True)
