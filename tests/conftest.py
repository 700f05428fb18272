"""Shared fixtures, one JAX compilation cache per pytest process, and XLA's CPU backend at LLVM -O0.

Most of the suite's time is XLA compiling on the CPU, and many tests compile programs another test (or a `python -m
train` / `wmjax.sample` subprocess) already compiled: the same tiny model's forward pass under a new `jax.jit`, the
train step of a run that is killed and resumed, the sampler of a run that the sampling CLI then reloads. JAX's
persistent compilation cache serves such a program from disk instead of compiling it again (the same executable:
nothing is skipped or changed). The cache is a fresh temporary directory for each pytest process (each xdist
worker has its own, so no two processes write one at the same time), inherited by the subprocesses the tests start
through the environment, and removed when the process exits: every run starts cold, as CI does.

The CPU backend's LLVM optimization level is 0 (`--xla_backend_optimization_level=0`, appended to XLA_FLAGS, which
the subprocesses inherit and extend): the suite's programs are tiny, so LLVM's optimization passes cost more than
they save (917 -> 625 s for the suite on 2 cores). The programs are the same; their rounding may differ from -O3 in
the last bit where LLVM would have fused a multiply and an add, which every tolerance here absorbs (the one test
that compares two different programs' losses over several steps, test_train.py's shard_map test, does so without
the dynamic mask's top-k, whose near-tied picks any change of rounding can flip).
"""

import atexit
import os
import shutil
import tempfile

_JIT_CACHE = tempfile.mkdtemp(prefix="wmjax-tests-jit-cache-")
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE  # read by jax at import, here and in every subprocess
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _JIT_CACHE)  # in case a plugin imported jax before this file

from train.tokenizer import read_text, stdlib_files, train_tokenizer  # noqa: E402


def pytest_unconfigure(config):
    shutil.rmtree(_JIT_CACHE, ignore_errors=True)  # (atexit may not run in an xdist worker)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 512-piece sentencepiece BPE model trained by train/'s own recipe (pad 0, unk 1, bos 2, eos 3, byte
    fallback, user-defined "\\n" / "    " / "\\t") on ~200 KB of the standard library (about a second)."""
    files = stdlib_files()[::25]
    return train_tokenizer((read_text(f) for f in files), str(tmp_path_factory.mktemp("sp") / "sp512"), 512,
                           max_bytes=200_000)
