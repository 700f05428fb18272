"""Greedy decode throughput of each model family's training config (random-init weights, bf16) through
`wmjax.sampling.generate`, the path `python -m wmjax.sample` runs.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/sample_families.py \\
        [--configs configs/cheems-160m.yaml,configs/otce-160m.yaml,configs/om-300m.yaml] [--batch-sizes 1,16]
    python bench/sample_families.py --tiny      # CPU smoke test: the -tiny configs, short runs

Prompt 128 random tokens, 256 new tokens, no stop token (every row generates all of them); tok/s = batch * new /
wall time of the whole `generate` call (prefill included), best of --repeats after a compile + warm-up call.
No peer: the upstream PyTorch models have no working cached decoding (docs/CHEEMS.md, docs/OTCE.md, docs/OM.md),
so their figure would be a quadratic recomputation, not a decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from train.config import load_config  # noqa: E402
from train.model import build_model_config  # noqa: E402
from wmjax.models.registry import family_of  # noqa: E402
from wmjax.sampling import generate  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/cheems-160m.yaml,configs/otce-160m.yaml,configs/om-300m.yaml")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    configs = a.configs.split(",")
    if a.tiny:
        configs = [c.replace("-160m", "-tiny").replace("-300m", "-tiny") for c in configs]
        a.prompt_len, a.new, a.repeats, a.vocab = 16, 8, 1, 512
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jnp.dtype(dtype).name}", flush=True)
    rows = []
    for path in configs:
        section = dict(load_config(path).model)
        section["vocab_size"] = a.vocab
        cfg = build_model_config(section, a.vocab, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        fam = family_of(cfg)
        params = fam.init_params(cfg, jax.random.PRNGKey(0))
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                        params)
        model = fam.model_cls(cfg, dtype=dtype, param_dtype=dtype)
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        for bs in [int(x) for x in a.batch_sizes.split(",")]:
            prompts = np.random.default_rng(0).integers(3, a.vocab, (bs, a.prompt_len)).tolist()
            run = lambda: generate(model, params, prompts, max_new_tokens=a.new, stop_tokens=[])
            t0 = time.perf_counter()
            out = run()
            jax.block_until_ready(out.tokens)
            compile_s = time.perf_counter() - t0
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                out = run()
                jax.block_until_ready(out.tokens)
                best = min(best, time.perf_counter() - t0)
            assert int(out.lengths.min()) == a.new, out.lengths
            r = {"config": os.path.basename(path), "family": fam.name, "params_m": n / 1e6, "batch": bs,
                 "prompt": a.prompt_len, "new": a.new, "s": best, "tok_s": bs * a.new / best, "compile_s": compile_s}
            rows.append(r)
            print(f"{r['config']:>18} {fam.name:>7} {n / 1e6:7.1f}M bs={bs:<3} {r['tok_s']:>10,.0f} tok/s "
                  f"({best * 1e3:.0f} ms for {a.new} new tokens; first call {compile_s:.1f} s)", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
