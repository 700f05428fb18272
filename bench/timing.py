"""Shared helpers of the kernel benchmarks: relative error, wall-clock timing of jitted (or torch) calls, and the
device's copy bandwidth (the byte floors' denominator)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["rel", "time_fn", "jax_sync", "copy_bandwidth"]


def rel(a, b):
    """||a - b|| / ||b|| in float64 (arrays of any float dtype)."""
    a = np.asarray(a, np.float32).astype(np.float64)
    b = np.asarray(b, np.float32).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_fn(fn, sync, n_inner=10, reps=9, warm=3, warm_s=0.3):
    """Median (and (min, max)) over `reps` of (n_inner back-to-back calls of fn, one sync(result)) / n_inner, in
    seconds, after `warm` synced calls and at least `warm_s` seconds of them (the GPU's clocks ramp up after an idle
    spell: a sub-millisecond kernel timed right after a compile otherwise reads up to 2x slow)."""
    t_end = time.perf_counter() + warm_s
    done = 0
    while done < warm or time.perf_counter() < t_end:
        sync(fn())
        done += 1
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n_inner):
            r = fn()
        sync(r)
        ts.append((time.perf_counter() - t0) / n_inner)
    return statistics.median(ts), (min(ts), max(ts))


def jax_sync(r):
    jax.block_until_ready(r)


def copy_bandwidth():
    """Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB f32 array, measured here."""
    a = jnp.ones((256 * 1024 * 1024,), jnp.float32)
    copy = jax.jit(lambda v: v * 1.0001)
    t, _ = time_fn(lambda: copy(a), jax_sync, n_inner=5, reps=5)
    del a
    return 2 * 256 * 1024 * 1024 * 4 / t
