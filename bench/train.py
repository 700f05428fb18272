"""Benchmark: Doge-160M training throughput, wmjax (the `python -m train` step) vs transformers, one process.

Model: the published Doge-160M (vocab 32768, d 768, F 1536, 24 layers, 6 heads / 3 kv heads, head_dim 128,
tied embeddings, keep_window_size 2048), L = 2048, random documents of 500-6,000 tokens packed with segment ids
(as `python -m train` feeds them; --segments 0 for plain causal rows).

* wmjax: exactly the train step of ``python -m train`` (train.trainer make_loss_fn / make_grad_fn /
  make_train_step: bf16 compute, f32 master params, optax AdamW + global-norm clip + WSD schedule),
  ``jax.jit`` with in/out shardings over a (data, fsdp, tensor) mesh, attention through wmjax's dispatcher
  (the Pallas flash dynamic-mask kernel on GPU).
* HF: ``transformers.DogeForCausalLM`` (attn_implementation="sdpa"), f32 params, ``torch.autocast(bf16)``,
  ``torch.optim.AdamW(fused=True)``, clip_grad_norm_ 1.0; forward with labels, backward, step, zero_grad.

MFU counts 6N + 6 * layers * H * head_dim * L FLOPs per token (N = all 152.7M params, attention causal:
fwd 2 matmuls * 2 FLOPs * L/2 keys, x3 for fwd+bwd) against 989 TFLOP/s dense bf16 (H100/H200 SXM).

    XLA_PYTHON_CLIENT_PREALLOCATE=false python bench/train.py [--batch 4,8,16] [--hf-batch 4] [--steps 10]
        [--remat 0,1] [--scaling]        # --scaling: 1 GPU vs all GPUs, data parallel and FSDP
    python bench/train.py --tiny          # CPU smoke test with a tiny model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402

PEAK = 989e12


def flops_per_token(cfg, n_params, seq):
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return 6 * n_params + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * hd * seq


def model_config(tiny: bool):
    from wmjax.config import DogeConfig

    if tiny:
        return DogeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, keep_window_size=2048,
                          max_position_embeddings=2048, tie_word_embeddings=True)
    return DogeConfig.preset("Doge-160M")


# --------------------------------------------------------------------------------------------------------------


BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def packed_batches(cfg, batch, seq, n=3, seed=0, data=None):
    """`n` batches as `python -m train` feeds them: random documents `[bos, ids, eos]` of 500-6,000 tokens packed
    back to back (train.data.pack: segment ids, per-document positions, loss mask), or with ``data`` (a token
    file from `python -m train.prepare`) the run's own first batches."""
    from train.data import BatchIterator, PackedDataset, pack

    if data:
        it = BatchIterator(PackedDataset([data], seq, seed), batch)
        return [next(it) for _ in range(n)]
    rng = np.random.default_rng(seed)
    bos, eos = cfg.bos_token_id or 0, cfg.eos_token_id if cfg.eos_token_id is not None else 1
    low = max(bos, eos, cfg.pad_token_id or 0) + 1
    out = []
    for _ in range(n):
        rows = []
        for _ in range(batch):
            toks = []
            while len(toks) < seq + 1:
                toks += [bos, *rng.integers(low, cfg.vocab_size, rng.integers(500, 6000)).tolist(), eos]
            start = int(rng.integers(0, len(toks) - seq))
            rows.append(toks[start:start + seq + 1])
        out.append(pack(np.asarray(rows, np.int32), eos, bos))
    return out


def bench_wmjax(cfg, batch, seq, steps, warmup, remat, mesh_shape, devices, spmd="auto", loss_impl="auto",
                chunk_tokens=8192, profile=0, tag="", compiler_options=None, segments=True, data=None):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from train import sharding as shd
    from train.config import OptimizerConfig
    from train.optim import make_optimizer
    from train.loss import make_loss_fn
    from train.sharding import opt_state_shardings
    from train.step import build_grad_fn, make_train_step
    from wmjax.models.doge import DogeForCausalLM, init_params, param_logical_axes
    from wmjax.random_init import fast_random_compile

    mesh = shd.make_mesh(*mesh_shape, devices=devices)
    model = DogeForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=bool(remat))
    tx, sched = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=10), 1000)
    shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.PRNGKey(0))
    psh = shd.param_shardings(param_logical_axes(cfg), shapes, mesh, warn=None)
    osh = opt_state_shardings(jax.eval_shape(tx.init, shapes), shapes, psh, mesh)
    rep = shd.replicated(mesh)
    ssh = {"params": psh, "opt_state": osh, "step": rep, "rng": rep}
    bsh = shd.batch_sharding(mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.flax_rules()):
        def init_state(r):
            p = init_params(cfg, r)
            return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32), "rng": r}

        with fast_random_compile():
            state = jax.jit(init_state, out_shardings=ssh)(jax.random.PRNGKey(0))
        loss_fn = make_loss_fn(model, cfg, 0.0, use_segments=segments, loss_impl=loss_impl,
                               chunk_tokens=chunk_tokens)
        grad_fn, spmd = build_grad_fn(loss_fn, 1, mesh, psh, cfg, spmd)
        step_fn = jax.jit(make_train_step(grad_fn, tx, sched, cfg, 0.0),
                          in_shardings=(ssh, {k: bsh for k in BATCH_KEYS}),
                          out_shardings=(ssh, rep), donate_argnums=(0,))
        batches = [{k: jax.device_put(v, bsh) for k, v in b.items()} for b in packed_batches(cfg, batch, seq, data=data)]
        t0 = time.perf_counter()
        print(f"[wmjax] b{batch} loss={loss_fn.impl} spmd={spmd}: lowering + compiling", flush=True)
        lowered = step_fn.lower(state, batches[0])
        print(f"[wmjax] lowered in {time.perf_counter() - t0:.1f}s", flush=True)
        step_fn = lowered.compile(compiler_options=compiler_options or None)  # AOT: the profile needs the HLO text
        print(f"[wmjax] compiled at {time.perf_counter() - t0:.1f}s", flush=True)
        state, m = step_fn(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for i in range(warmup):
            state, m = step_fn(state, batches[i % 3])
        jax.block_until_ready(m)
        losses = []
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step_fn(state, batches[i % 3])
            losses.append(m["loss"])
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
        losses = [float(x) for x in jax.device_get(losses)]
        prof = None
        if profile:
            holder = [state]

            def one_step():
                holder[0], mm = step_fn(holder[0], batches[0])
                return mm

            hlo_text = step_fn.as_text()
            if os.environ.get("OUT"):  # keep the optimized HLO next to the results (kernel -> op mapping offline)
                import gzip

                with gzip.open(os.path.join(os.environ["OUT"], f"hlo_b{batch}_{loss_fn.impl}.txt.gz"), "wt") as fh:
                    fh.write(hlo_text)
            prof = profile_step(one_step, hlo_text, iters=profile,
                                title=f"{tag or 'wmjax'} b{batch} loss={loss_fn.impl} ({dt * 1e3:.1f} ms/step timed)")
            state = holder[0]
        peak = 0
        for d in mesh.devices.flat:
            try:
                peak = max(peak, d.memory_stats().get("peak_bytes_in_use", 0))
            except Exception:
                pass
    del state, batches
    gc.collect()
    jax.clear_caches()
    return {"impl": "wmjax", "batch": batch, "seq": seq, "remat": int(remat), "mesh": dict(mesh.shape),
            "gpus": len(devices), "spmd": spmd, "step_ms": dt * 1e3, "tok_s": batch * seq / dt, "compile_s": compile_s,
            "n_params": n_params, "peak_gib": peak / 2**30, "loss_first": losses[0], "loss_last": losses[-1],
            "finite": bool(np.all(np.isfinite(losses))), "loss_impl": loss_fn.impl, "tag": tag,
            "profile": prof}


# --------------------------------------------------------------------------------------------------------------
# profile: per-kernel device time (bench/kernel_profile.py), grouped by what the kernel computes (from the optimized
# HLO's op_name metadata: flax module scopes + the trainer's "loss" / "optimizer" named scopes)

_GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma|sm90_|sm80_", re.IGNORECASE)


def hlo_ops(hlo_text: str) -> dict:
    """instruction name -> (opcode, op_name metadata, custom_call_target or '') from optimized HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        mt = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not mt:
            continue
        rest = mt.group(2)
        op = re.search(r"(?:^|[\s}\]])([a-z][a-z0-9\-]*)\(", rest)
        on = re.search(r'op_name="([^"]*)"', rest)
        cc = re.search(r'custom_call_target="([^"]*)"', rest)
        val = (op.group(1) if op else "", on.group(1) if on else "", cc.group(1) if cc else "")
        out[mt.group(1)] = val
        out.setdefault(_norm_name(mt.group(1)), val)
    return out


def _norm_name(name: str) -> str:
    # profiler kernel / hlo_op names may spell the HLO instruction "loop_add_fusion.26" as "loop_add_fusion_26"
    return re.sub(r"[.\-]", "_", name)


def lookup_op(ops: dict, *names) -> tuple:
    for n in names:
        if n and (n in ops or _norm_name(n) in ops):
            return ops.get(n) or ops[_norm_name(n)]
    return ("", "", "")


def categorize(kernel: str, hlo_op: str, ops: dict) -> str:
    opcode, op_name, target = lookup_op(ops, hlo_op, kernel)
    low = op_name.lower()
    where = "bwd" if "transpose(" in op_name else "fwd"
    in_loss = re.search(r"[/(]loss[/)]", op_name) is not None
    if kernel.startswith("dmattn") or "dmattn" in hlo_op:
        return "attention: Pallas kernels"
    if "memcpy" in kernel.lower() or "memset" in kernel.lower():
        return "memcpy/memset"
    if (_GEMM_KERNEL.search(kernel) or "cublas" in target or "gemm" in hlo_op or "triton_gemm" in hlo_op
            or opcode in ("dot", "convolution")):
        if in_loss or "attend" in low or "lm_head" in low:
            return "gemm: LM head (logits + grads)"
        if "self_attn" in low:
            return f"gemm: attention projections ({where})"
        if "mlp" in low:
            return f"gemm: mlp ({where})"
        return "gemm: other"
    if "optimizer" in op_name:
        return "optimizer (clip + AdamW)"
    if in_loss or "attend" in low:
        return "loss: softmax / lse / d logits"
    if "self_attn" in low:
        return f"attention layer: norms, rope, bias, glue ({where})"
    if "mlp" in low:
        return f"mlp elementwise ({where})"
    if "layernorm" in low or "/norm/" in low:
        return f"rmsnorm ({where})"
    if "residual" in low or re.search(r"layers_\d+/(add|mul)", low):
        return f"residual ({where})"
    if "embed_tokens" in low:
        return "embedding gather / scatter"
    if opcode in ("copy", "transpose") or hlo_op.startswith(("copy", "transpose")):
        return "copies / transposes"
    if "convert" in hlo_op or opcode == "convert":
        return "casts"
    if not op_name:
        return "unattributed (no HLO metadata)"
    return "other"


def profile_step(fn, hlo_text: str, iters: int = 3, title: str = ""):
    """Kernel table + category table of one train step; returns {'kernels': top rows, 'categories': ...}."""
    import glob
    import tempfile

    from jax.profiler import ProfileData

    from bench.kernel_profile import kernel_table, print_kernel_table

    logdir = tempfile.mkdtemp(prefix="wmjax_train_prof_")
    rows = kernel_table(fn, iters=iters, logdir=logdir)
    print_kernel_table(rows, top=30, title=title)
    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {"kernels": rows[:40], "categories": {}}
    ops = hlo_ops(hlo_text)
    prof = ProfileData.from_file(files[-1])
    cat_ns, cat_n, seen_stats, unmatched = {}, {}, set(), []
    for plane in prof.planes:
        if not (plane.name.startswith("/device:GPU") or plane.name.startswith("/device:TPU")):
            continue
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")] or [
            ln for ln in lines if not ln.name.startswith(("XLA", "Launch", "Steps", "TensorFlow"))]
        for line in streams:
            for ev in line.events:
                stats = {}
                try:
                    stats = {k: v for k, v in ev.stats}
                except Exception:
                    pass
                seen_stats.update(stats)
                hop = stats.get("hlo_op", "")
                hop = hop.decode() if isinstance(hop, bytes) else str(hop)
                c = categorize(ev.name, hop, ops)
                if lookup_op(ops, hop, ev.name) == ("", "", "") and len(unmatched) < 6:
                    unmatched.append((ev.name[:60], hop[:60]))
                cat_ns[c] = cat_ns.get(c, 0) + ev.duration_ns
                cat_n[c] = cat_n.get(c, 0) + 1
    total = sum(cat_ns.values()) or 1
    print(f"--- categories: {title} | device time per step {total / 1e6 / iters:.2f} ms "
          f"(event stats seen: {sorted(seen_stats)[:12]})")
    cats = {}
    for c, ns in sorted(cat_ns.items(), key=lambda kv: -kv[1]):
        cats[c] = {"ms": ns / 1e6 / iters, "count": cat_n[c] / iters, "share": ns / total}
        print(f"{ns / 1e6 / iters:9.2f} ms {100 * ns / total:5.1f}% {cat_n[c] / iters:7.0f}  {c}")
    if unmatched:
        print(f"    (no HLO metadata found for e.g. {unmatched}; HLO names e.g. {list(ops)[:4]})")
    sys.stdout.flush()
    return {"kernels": [dict(r, name=r["name"][:200]) for r in rows[:40]], "categories": cats,
            "device_ms": total / 1e6 / iters}


def bench_hf(cfg, batch, seq, steps, warmup):
    import torch
    import transformers

    d = cfg.to_hf_dict()
    d.pop("model_type", None)
    d.pop("architectures", None)
    hf_cfg = transformers.DogeConfig(**d)
    model = transformers.DogeForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").cuda().train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g) for _ in range(3)]
    torch.cuda.reset_peak_memory_stats()

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    t0 = time.perf_counter()
    step(xs[0])
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for i in range(warmup):
        step(xs[i % 3])
    torch.cuda.synchronize()
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(step(xs[i % 3]))
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    losses = [float(x) for x in losses]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, xs
    gc.collect()
    torch.cuda.empty_cache()
    return {"impl": "hf", "batch": batch, "seq": seq, "remat": 0, "mesh": {}, "gpus": 1, "step_ms": dt * 1e3,
            "tok_s": batch * seq / dt, "compile_s": first, "n_params": n_params, "peak_gib": peak,
            "loss_first": losses[0], "loss_last": losses[-1], "finite": bool(np.all(np.isfinite(losses))),
            "transformers": transformers.__version__, "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="4,8,16", help="wmjax batch sizes (sequences per step, per GPU)")
    ap.add_argument("--hf-batch", default="4", help="HF batch sizes ('' to skip HF)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--remat", default="0", help="wmjax remat settings to try, e.g. 0,1")
    ap.add_argument("--scaling", action="store_true", help="also all GPUs: data parallel and FSDP")
    ap.add_argument("--scaling-batch", type=int, default=0, help="per-GPU batch for the scaling runs")
    ap.add_argument("--spmd", default="auto,gspmd", help="DP/FSDP expression(s) for the scaling runs: "
                    "auto (= shard_map for dense DP/FSDP), gspmd, shard_map")
    ap.add_argument("--loss", default="auto", help="wmjax loss path(s): auto (= fused), fused, logits; e.g. logits,fused")
    ap.add_argument("--loss-chunk-tokens", default="8192", help="fused loss: tokens per chunk (comma list to sweep)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N steps per wmjax config (bench/kernel_profile.py kernel table + categories)")
    ap.add_argument("--xla-options", default="",
                    help="XLA option sets for the wmjax step, ';'-separated, each 'name=value name=value' passed to "
                         "the step's compile (jax compiler_options) in this process; an empty set = the defaults, "
                         "e.g. ';xla_gpu_enable_command_buffer='")
    ap.add_argument("--segments", default="1",
                    help="packed documents with segment ids as `python -m train` runs them (1, the default) and/or "
                         "without (0): e.g. 1,0")
    ap.add_argument("--data", default=None, help="token file (python -m train.prepare) to take the batches from "
                                                 "(default: random documents)")
    ap.add_argument("--tag", default="", help="label printed with the results (e.g. the XLA_FLAGS variant)")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    ap.add_argument("--traceback-after", type=float, default=0, metavar="S",
                    help="print every thread's Python stack each S seconds (find where a slow run spends its time)")
    args = ap.parse_args()
    if args.traceback_after > 0:
        import faulthandler
        faulthandler.dump_traceback_later(args.traceback_after, repeat=True)

    import jax

    from bench.xla_options import xla_option_sets

    cfg = model_config(args.tiny)
    devs = jax.devices()
    print(f"jax {jax.__version__} on {devs[0].device_kind} x{len(devs)} ({jax.default_backend()})", flush=True)
    results = []

    def record(r):
        n = r["n_params"]
        r["mfu"] = r["tok_s"] * flops_per_token(cfg, n, r["seq"]) / (PEAK * r["gpus"])
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)

    hf_batches = [int(b) for b in args.hf_batch.split(",") if b.strip()]
    if hf_batches and jax.default_backend() == "gpu":
        for b in hf_batches:
            try:
                record(bench_hf(cfg, b, args.seq, args.steps, args.warmup))
            except Exception as e:
                traceback.print_exc()
                print(f"HF b={b} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    for remat in [int(x) for x in args.remat.split(",")]:
        for b in [int(x) for x in args.batch.split(",")]:
            for loss in args.loss.split(","):
                chunks = args.loss_chunk_tokens.split(",") if loss != "logits" else args.loss_chunk_tokens.split(",")[:1]
                variants = [(c, o, sg) for c in chunks for o in xla_option_sets(args.xla_options)
                            for sg in args.segments.split(",")]
                for ct, (opts, copts), sg in variants:
                    try:
                        seg = sg.strip() in ("1", "true")
                        tag = " ".join(x for x in (args.tag, opts, "" if seg else "no-segments",
                                                   "data=" + os.path.basename(args.data) if args.data else "") if x)
                        record(bench_wmjax(cfg, b, args.seq, args.steps, args.warmup, remat, (1, 1, 1), devs[:1],
                                           loss_impl=loss, chunk_tokens=int(ct), profile=args.profile,
                                           tag=tag, compiler_options=copts or None, segments=seg,
                                           data=args.data))
                    except Exception as e:
                        traceback.print_exc()
                        print(f"wmjax b={b} remat={remat} loss={loss} failed: {type(e).__name__}: {str(e)[:300]}",
                              flush=True)
    if args.scaling and len(devs) > 1:
        n = len(devs)
        pb = args.scaling_batch or int(args.batch.split(",")[-1])
        remat = int(args.remat.split(",")[-1])
        one = [r for r in results if r["impl"] == "wmjax" and r["batch"] == pb and r["remat"] == remat]
        if not one:
            record(bench_wmjax(cfg, pb, args.seq, args.steps, args.warmup, remat, (1, 1, 1), devs[:1]))
        for spmd in args.spmd.split(","):
            for name, shape in (("dp", (n, 1, 1)), ("fsdp", (1, n, 1))):
                try:
                    r = bench_wmjax(cfg, pb * n, args.seq, args.steps, args.warmup, remat, shape, devs, spmd)
                    r["parallel"] = name
                    record(r)
                except Exception as e:
                    traceback.print_exc()
                    print(f"wmjax {name} x{n} {spmd} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

    base = {}
    for r in results:
        if r["impl"] == "wmjax" and r["gpus"] == 1:
            base[(r["batch"], r["remat"])] = r["tok_s"]
    hf_best = max([r["tok_s"] for r in results if r["impl"] == "hf"] or [0])
    print()
    print(f"{'impl':6} {'par':5} {'spmd':9} {'gpus':>4} {'batch':>5} {'remat':>5} {'loss':>7} {'step ms':>9} {'tok/s':>10} "
          f"{'MFU':>6} {'peak GiB':>8} {'vs HF':>6} {'scal.eff':>8} {'compile s':>9}  tag")
    for r in results:
        eff = ""
        if r["gpus"] > 1:
            b1 = base.get((r["batch"] // r["gpus"], r["remat"]))
            if b1:
                eff = f"{r['tok_s'] / (b1 * r['gpus']):.1%}"
        vs = f"{r['tok_s'] / hf_best:.2f}x" if hf_best else ""
        print(f"{r['impl']:6} {r.get('parallel', '-'):5} {r.get('spmd', '-'):9} {r['gpus']:>4} {r['batch']:>5} {r['remat']:>5} "
              f"{r.get('loss_impl', '-'):>7} {r['step_ms']:>9.1f} {r['tok_s']:>10,.0f} {r['mfu']:>6.1%} {r['peak_gib']:>8.1f} "
              f"{vs:>6} {eff:>8} {r['compile_s']:>9.1f}  {r.get('tag', '')}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"jax": jax.__version__, "device": devs[0].device_kind, "n_devices": len(devs),
                       "results": results}, fh, indent=1)
    except OSError:
        pass


if __name__ == "__main__":
    main()
