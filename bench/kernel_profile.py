"""Kernel-level time breakdown of a jitted call, from JAX's own profiler (no nsys needed).

    from bench.kernel_profile import kernel_table, print_kernel_table
    rows = kernel_table(lambda: step(state, batch), iters=3)     # runs fn under jax.profiler.trace
    print_kernel_table(rows, top=25, title="train step b16")

`kernel_table` runs `fn` once untraced (compile / warm-up), then `iters` times under `jax.profiler.trace`, reads
the written XSpace with `jax.profiler.ProfileData` and sums the device events (GPU kernels, memcpys) by name:
returns a list of dicts {name, total_ms (per iteration), count (per iteration), mean_us, share} sorted by time.
On CPU there is no device plane: the table is empty (the function still runs), so scripts can call it anywhere.

    python bench/kernel_profile.py              # self-test: a matmul + softmax, prints the table (CPU: empty table)
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
from typing import Callable, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _device_planes(profile):
    return [p for p in profile.planes if p.name.startswith("/device:GPU") or p.name.startswith("/device:TPU")]


def _short(name: str, width: int = 90) -> str:
    name = re.sub(r"\s+", " ", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def _stream_lines(plane):
    # XLA GPU planes carry one line per CUDA stream plus derived lines ("XLA Ops", "XLA Modules", ...);
    # kernels live on the stream lines (if none is named so, take every line but the derived ones).
    lines = list(plane.lines)
    streams = [ln for ln in lines if ln.name.startswith("Stream")]
    return streams or [ln for ln in lines if not ln.name.startswith(("XLA", "Launch", "Steps", "TensorFlow"))]


def _newest_profile(logdir: str):
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    return ProfileData.from_file(files[-1]) if files else None


def device_timeline(logdir: str) -> dict | None:
    """Of the newest trace in `logdir`: kernel events, device busy time (union of kernel intervals) and span
    (first start .. last end), in ms; busy < span means the device waited (e.g. on host launches)."""
    prof = _newest_profile(logdir)
    if prof is None:
        return None
    iv = sorted((ev.start_ns, ev.end_ns) for plane in _device_planes(prof) for line in _stream_lines(plane)
                for ev in line.events)
    if not iv:
        return None
    busy, cur_s, cur_e = 0, iv[0][0], iv[0][1]
    for s_, e_ in iv[1:]:
        if s_ > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s_, e_
        else:
            cur_e = max(cur_e, e_)
    busy += cur_e - cur_s
    return dict(events=len(iv), busy_ms=busy / 1e6, span_ms=(iv[-1][1] - iv[0][0]) / 1e6)


def kernel_table(fn: Callable, iters: int = 3, logdir: str | None = None) -> List[dict]:
    """Sum device event time by kernel name over `iters` traced calls of `fn` (after one untraced call)."""
    import jax

    jax.block_until_ready(fn())
    logdir = logdir or tempfile.mkdtemp(prefix="wmjax_prof_")
    with jax.profiler.trace(logdir):
        for _ in range(iters):
            jax.block_until_ready(fn())
    prof = _newest_profile(logdir)
    if prof is None:
        return []
    tot = collections.Counter()
    cnt = collections.Counter()
    for plane in _device_planes(prof):
        for line in _stream_lines(plane):
            for ev in line.events:
                tot[ev.name] += ev.duration_ns
                cnt[ev.name] += 1
    total = sum(tot.values()) or 1
    rows = [dict(name=n, total_ms=t / 1e6 / iters, count=cnt[n] / iters, mean_us=t / 1e3 / cnt[n],
                 share=t / total) for n, t in tot.most_common()]
    return rows


def print_kernel_table(rows: List[dict], top: int = 25, title: str = "") -> None:
    total = sum(r["total_ms"] for r in rows)
    n = sum(r["count"] for r in rows)
    print(f"--- kernels{': ' + title if title else ''} | device time per call {total:.3f} ms in {n:.0f} events")
    print(f"{'ms/call':>9} {'share':>6} {'count':>6} {'mean us':>8}  name")
    for r in rows[:top]:
        print(f"{r['total_ms']:9.3f} {100 * r['share']:5.1f}% {r['count']:6.0f} {r['mean_us']:8.1f}  {_short(r['name'])}")
    if len(rows) > top:
        rest = rows[top:]
        print(f"{sum(r['total_ms'] for r in rest):9.3f} {100 * sum(r['share'] for r in rest):5.1f}% "
              f"{sum(r['count'] for r in rest):6.0f}           ({len(rest)} more kernel names)")
    sys.stdout.flush()


if __name__ == "__main__":
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    f = jax.jit(lambda x: jax.nn.softmax(x @ x, axis=-1).sum())
    rows = kernel_table(lambda: f(x))
    print_kernel_table(rows, title=f"self-test on {jax.devices()[0].platform}")
