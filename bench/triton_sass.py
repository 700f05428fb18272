"""Static SASS of the selective-scan kernels without a GPU: registers, spills, instruction mix, and which TTIR line
each instruction comes from.

Pallas lowers the op for an abstract H100 (as the lowering tests do); each Triton kernel's TTIR is captured and
compiled for sm_90 by the `triton` package (its bundled ptxas / cuobjdump / nvdisasm) with fp fusion off, like
Pallas' GPU build (which never contracts a b + c). The counts track the GPU's static counts within ~7% (Triton 3.6
here, jaxlib's own Triton there): a proxy for "did this change remove instructions", not for time.

    pip install triton==3.6.0        # CPU is enough
    python bench/triton_sass.py                                   # b2 L8192 E2048 N16, forward + training kernels
    python bench/triton_sass.py --shape 4 2048 768 64 --mode train --set sub_blocks_bwd=1
    python bench/triton_sass.py --attr "SHFL" --kernel selective_scan_bwd   # shuffles by TTIR line
    python bench/triton_sass.py --shape 16 2048 512 64 --mode train --loops  # loop bodies (the chunk loops)

--attr prints, for the kernel named by --kernel, the TTIR lines with the most instructions matching the opcode
regex (count of matching / all instructions of that line, then the line).
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import lowering as pallas_triton  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as registration  # noqa: E402

from abstract_gpu import abstract_h100  # noqa: E402
from pallas_kernels.selective_scan import selective_scan_pallas, tuning  # noqa: E402

_SASS_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def capture_ttir(fn, args):
    """[(kernel name, TTIR text without locations)] of every pallas_call lowered by jit(fn)(*args) for an H100."""
    captured, original = [], pallas_triton.lower_jaxpr_to_triton_module

    def capture(jaxpr, *a, **k):
        res = original(jaxpr, *a, **k)
        captured.append((jaxpr.debug_info.func_name, res.module.operation.get_asm(enable_debug_info=False)))
        return res

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with abstract_h100():
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = original
    return captured


def compile_sass(ttir, num_warps, workdir):
    """Compiles TTIR text for sm_90: dict(regs, spill_bytes, sass (nvdisasm with TTIR line info), ops Counter)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = os.path.join(workdir, "k.ttir")   # without locations, the parser tags each op with its line in this file
    with open(src, "w") as fh:
        fh.write(ttir)
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=2, enable_fp_fusion=False))
    cubin = os.path.join(workdir, "k.cubin")
    with open(cubin, "wb") as fh:
        fh.write(kern.asm["cubin"])
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                         text=True).stdout
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True).stdout
    ops = collections.Counter(m.group(1).split(".")[0] for m in _SASS_OP.finditer(sass))
    regs, spill = (int(re.search(pattern, res).group(1)) for pattern in (r"REG:(\d+)", r"STACK:(\d+)"))
    return dict(regs=regs, spill_bytes=spill, sass=sass, ops=ops)


def by_ttir_line(sass, ttir, op_regex):
    """[(matching count, all count, TTIR line)] per TTIR line, most matching first."""
    lines, cur = ttir.split("\n"), None
    match, total = collections.Counter(), collections.Counter()
    for ln in sass.split("\n"):
        m = re.search(r'## File ".*", line (\d+)', ln)
        if m:
            cur = int(m.group(1))
            continue
        m = _SASS_OP.search(ln)
        if m:
            total[cur] += 1
            if re.fullmatch(op_regex, m.group(1)):
                match[cur] += 1
    return [(c, total[n], lines[n - 1].strip() if n else "?") for n, c in match.most_common()]


def scan_args(b, L, E, N):
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    return (S((b, L, E), bf), S((b, L, E), bf), S((E, N), jnp.float32), S((b, L, N), bf), S((b, L, N), bf),
            S((E,), jnp.float32), S((b, L, E), bf), S((E,), jnp.float32))


def forward(x, dt, A, B, C, D, z, bias):
    return selective_scan_pallas(x, dt, A, B, C, D=D, z=z, dt_bias=bias)[0]


def training(*args):
    return jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum(), argnums=tuple(range(8)))(*args)


def loops(sass):
    """[(first line, last line, instruction Counter)] of each loop in the SASS (a backward branch to a label), outer
    loops before the loops they hold. An outer loop's count includes its inner loops' bodies once: per trip of the
    outer loop, it executes (outer - inner) + trips x inner."""
    lines = sass.split("\n")
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", ln))}
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i - 2:
            ops = collections.Counter(k.group(1) for x in lines[labels[m.group(1)]:i + 1] if (k := _SASS_OP.search(x)))
            out.append((labels[m.group(1)], i, ops))
    return sorted(out, key=lambda t: (t[0], -t[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=4, default=(2, 8192, 2048, 16), metavar=("B", "L", "E", "N"))
    ap.add_argument("--mode", choices=("fwd", "train", "both"), default="both")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="tuning.override field (repeatable), e.g. sub_blocks_bwd=1")
    ap.add_argument("--attr", default=None, metavar="OPCODE_REGEX", help="instructions by TTIR line")
    ap.add_argument("--kernel", default="selective_scan_bwd", help="the kernel --attr reads")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--loops", action="store_true", help="instruction counts of each kernel's loop bodies")
    a = ap.parse_args()
    fields = {}
    for item in a.set:
        key, _, value = item.partition("=")
        fields[key] = ast.literal_eval(value)
    args = scan_args(*a.shape)
    n = 1 << (a.shape[3] - 1).bit_length()
    with tuning.override(**fields):
        tune = tuning.current()
        warps = {"selective_scan_fwd": tune.warps("fwd", n), "selective_scan_fwd_parts": tune.warps("fwd", n),
                 "selective_scan_bwd": tune.warps("bwd", n), "selective_scan_bwd_parts": tune.warps("bwd", n)}
        for mode in (("fwd", "train") if a.mode == "both" else (a.mode,)):
            for name, ttir in capture_ttir(forward if mode == "fwd" else training, args):
                with tempfile.TemporaryDirectory() as tmp:
                    k = compile_sass(ttir, warps.get(name, 4), tmp)
                mix = ", ".join(f"{op} {c}" for op, c in k["ops"].most_common(10))
                print(f"[{mode}] {name}: {k['regs']} registers, {k['spill_bytes']} spill bytes, "
                      f"{sum(k['ops'].values())} instructions: {mix}")
                if a.loops:
                    for first, last, ops in loops(k["sass"]):
                        smem = sum(ops[o] for o in ("STS", "LDS", "LDSM", "STSM"))
                        print(f"    loop at SASS line {first}-{last}: {sum(ops.values())} instructions, "
                              f"BAR {ops['BAR']}, SHFL {ops['SHFL']}, shared memory {smem}, MUFU {ops['MUFU']}")
                if a.attr and name == a.kernel:
                    for c, tot, line in by_ttir_line(k["sass"], ttir, a.attr)[:a.top]:
                        print(f"  {c:5d} / {tot:5d}  {line[:140]}")


if __name__ == "__main__":
    main()
