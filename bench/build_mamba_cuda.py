"""The selective-scan peer: mamba_ssm 2.3.2.post1's CUDA extension ``selective_scan_cuda``, for the benchmarks only.

    python3 bench/build_mamba_cuda.py --fetch     # here (needs the package index): the sdist's csrc/selective_scan
                                                  # -> .anchors/mamba_cuda/csrc (git-ignored; carry .anchors)
    python3 bench/build_mamba_cuda.py             # on the GPU machine (nvcc, torch): builds it for sm_90 into
                                                  # .anchors/mamba_cuda/build (~2-3 min at MAX_JOBS=6); nothing
                                                  # to do when build/selective_scan_cuda.so is there (or its
                                                  # selective_scan_cuda.so.xz, a copy brought back from a device)

The build uses the sdist's own nvcc flags (its setup.py) and torch's JIT extension loader;
bench/selective_scan.py imports the result from .anchors/mamba_cuda/build. Nothing of mamba_ssm is committed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOME = os.path.join(ROOT, ".anchors", "mamba_cuda")
VERSION = "2.3.2.post1"
NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "-lineinfo",
              "-gencode", "arch=compute_90,code=sm_90"]


def fetch():
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation", "-d", tmp,
                        f"mamba-ssm=={VERSION}"], check=True, env=env)
        (sdist,) = glob.glob(os.path.join(tmp, "mamba_ssm-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        dst = os.path.join(HOME, "csrc")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(os.path.join(tmp, f"mamba_ssm-{VERSION}", "csrc", "selective_scan"),
                        os.path.join(dst, "selective_scan"))
    print(f"mamba_ssm {VERSION} csrc/selective_scan -> {dst}")


def build():
    from torch.utils.cpp_extension import load

    src = os.path.join(HOME, "csrc", "selective_scan")
    if not os.path.isdir(src):
        raise SystemExit(f"{src}: no such directory (run `python3 bench/build_mamba_cuda.py --fetch` first)")
    out = os.path.join(HOME, "build")
    os.makedirs(out, exist_ok=True)
    so = os.path.join(out, "selective_scan_cuda.so")
    if not os.path.exists(so) and os.path.exists(so + ".xz"):
        subprocess.run(["xz", "-d", "-k", so + ".xz"], check=True)
    if os.path.exists(so):
        print(f"selective_scan_cuda: prebuilt {so} (same image: torch, CUDA, Python), not rebuilt")
        return
    os.environ.setdefault("MAX_JOBS", "16")
    files = ["selective_scan.cpp"] + [f"selective_scan_fwd_{t}.cu" for t in ("fp32", "fp16", "bf16")] + \
        [f"selective_scan_bwd_{t}_{k}.cu" for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
    t0 = time.time()
    load(name="selective_scan_cuda", sources=[os.path.join(src, f) for f in files], extra_cflags=["-O3", "-std=c++17"],
         extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=[src], build_directory=out, verbose=False)
    print(f"built selective_scan_cuda in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fetch", action="store_true", help="download the sdist's csrc/selective_scan (no build)")
    fetch() if ap.parse_args().fetch else build()
