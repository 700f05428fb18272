"""Benchmark: flash dynamic-mask attention (wmjax Pallas kernel, pre-pass included) vs peers, one process.

Doge-160M heads (h_q=6, h_kv=3, d=128), bf16, keep_window_size w=2048, causal, per-key bias f32.
Shapes (b, L): (4, 2048), (2, 8192), (1, 32768); forward and forward+backward (grads of q, k, v, bias).
Peers: tokamax `dot_product_attention` (mosaic, causal + key bias, dense: no top-k), the HF path (dense
[b, h, L, L] mask build with torch.topk + SDPA), flash-dmattn 1.2.2's Triton kernel (dense mask/bias inputs).
All outputs (and grads where the op is the same) are checked against each other.

Run on the GPU (peers from ../shared/tools/fetch_anchors.sh):
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.anchors/py:$PYTHONPATH python bench/dmattn.py
Flags: --shapes 4x2048,2x8192,1x32768  --skip hf,fdm,tokamax  --check-only
TFLOP/s use the dense-causal convention for every implementation (fwd 4*b*h*L^2*d/2, fwd+bwd 3.5x that), so
they are "equivalent" rates; the top-k kernel does fewer FLOPs than that at L > w.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.kernel_profile import kernel_table  # noqa: E402
from pallas_kernels.dmattn import dynamic_mask_attention_pallas, prepare_mask, tuning  # noqa: E402
from pallas_kernels.dmattn.backward import flash_backward  # noqa: E402
from pallas_kernels.dmattn.forward import flash_forward  # noqa: E402
from bench.timing import rel  # noqa: E402
from pallas_kernels.dmattn.ops import _cap  # noqa: E402
from pallas_kernels.dmattn.reference import dynamic_mask_attention_reference  # noqa: E402

H, G, D, W = 6, 3, 128, 2048



def time_jax(f, args, n=10, trials=7):
    out = f(*args)
    jax.block_until_ready(out)
    out = f(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n)
    return float(np.median(ts)) * 1e3


def time_torch(fn):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_inputs(b, length, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, length, H, D), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, length, G, D), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, length, G, D), jnp.float32).astype(jnp.bfloat16)
    dt = jax.random.normal(ks[3], (b, G, length), jnp.float32)
    bias = jnp.exp(-0.7 * jax.nn.softplus(dt))  # Doge's exp(A softplus(dt)), distinct values
    do = jax.random.normal(ks[4], (b, length, H, D), jnp.float32).astype(jnp.bfloat16)
    return q, k, v, bias, do


def wmjax_fns(length, w):
    pos = jnp.arange(length, dtype=jnp.int32)[None]

    def fwd(q, k, v, bias):
        p = jnp.broadcast_to(pos, q.shape[:2])
        return dynamic_mask_attention_pallas(q, k, v, bias, keep_window_size=w, query_positions=p, key_positions=p,
                                             interpret=False)

    def fwdbwd(q, k, v, bias, do):
        out, vjp = jax.vjp(fwd, q, k, v, bias)
        return (out,) + vjp(do)

    return jax.jit(fwd), jax.jit(fwdbwd)


def tokamax_fns():
    import tokamax

    def fwd(q, k, v, bias):
        bias_h = jnp.repeat(bias, H // G, axis=1)[:, :, None, :]  # (b, h, 1, L) f32 per-key bias
        return tokamax.dot_product_attention(q, k, v, bias=bias_h, is_causal=True, implementation="mosaic")

    def fwdbwd(q, k, v, bias, do):
        out, vjp = jax.vjp(fwd, q, k, v, bias)
        return (out,) + vjp(do)

    return jax.jit(fwd), jax.jit(fwdbwd)


def to_torch(x, dtype=None):
    import torch
    t = torch.from_numpy(np.array(x, np.float32)).cuda()
    return t if dtype is None else t.to(dtype)


def hf_fns(w):
    """HF transformers Doge (sdpa): prepare_dynamic_mask (expand, causal fill, topk, scatter) + repeat_kv + SDPA."""
    import torch
    import torch.nn.functional as F

    def build_mask(bias, length, dtype=torch.bfloat16):  # bias (b, g, L) f32 -> (b, h, L, L) additive mask
        min_dtype = torch.finfo(dtype).min
        attn = bias[:, :, None, :].expand(-1, -1, length, -1)
        causal = torch.ones(length, length, dtype=torch.bool, device=bias.device).triu(1)
        attn = attn.masked_fill(causal, min_dtype)
        if length > w:
            active = torch.zeros_like(attn)
            idx = torch.topk(attn, w, dim=-1, largest=True, sorted=False).indices
            active = active.scatter(-1, idx, 1.0)
            attn = attn.masked_fill(active == 0.0, min_dtype)
        return attn.repeat_interleave(H // G, dim=1).to(dtype)

    def fwd(q, k, v, bias):  # q (b, h, L, d), k/v (b, g, L, d)
        mask = build_mask(bias, q.shape[2], q.dtype)
        kk = k.repeat_interleave(H // G, dim=1)
        vv = v.repeat_interleave(H // G, dim=1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=D ** -0.5)

    return build_mask, fwd


def fdm_fn(w):
    from flash_dmattn.flash_dmattn_triton import triton_dmattn_func

    def fwd(q, k, v, mask, bias):  # q (b, L, h, d); k, v (b, L, h, d) repeated; mask/bias (b, h, L, L)
        return triton_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True, softmax_scale=D ** -0.5)

    return fwd


def gpu_f32_check():
    """Small f32 parity check of the kernel (IEEE dots) against the jnp reference, on the device."""
    b, length, h, g, d, w = 2, 1000, 4, 2, 64, 300
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    q = jax.random.normal(ks[0], (b, length, h, d))
    k = jax.random.normal(ks[1], (b, length, g, d))
    v = jax.random.normal(ks[2], (b, length, g, d))
    bias = jnp.exp(-0.7 * jax.nn.softplus(jax.random.normal(ks[3], (b, g, length))))
    do = jax.random.normal(ks[4], (b, length, h, d))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    km = jnp.arange(length)[None, :] < jnp.array([length, length - 77])[:, None]  # right padding
    res = {}
    for name, fn in (("pallas", lambda *a: dynamic_mask_attention_pallas(*a, keep_window_size=w, query_positions=pos,
                                                                         key_positions=pos, key_mask=km,
                                                                         interpret=False)),
                     ("ref", lambda *a: dynamic_mask_attention_reference(*a, keep_window_size=w, query_positions=pos,
                                                                         key_positions=pos, key_mask=km))):
        def f(q, k, v, bias, fn=fn):
            out, vjp = jax.vjp(fn, q, k, v, bias)
            return (out,) + vjp(do)
        res[name] = jax.jit(f)(q, k, v, bias)
    names = ("out", "dq", "dk", "dv", "dbias")
    errs = {n: rel(a, e) for n, a, e in zip(names, res["pallas"], res["ref"])}
    print("GPU f32 parity (b2 L1000 h4 g2 d64 w300, padding):", {k_: f"{v_:.2e}" for k_, v_ in errs.items()},
          "PASS" if max(errs.values()) <= 1e-4 else "FAIL", flush=True)
    return errs


def bf16_check(skip=()):
    """bf16, Doge heads: wmjax (sparse and L <= w paths) and tokamax vs the f32 jnp reference (out and grads)."""
    names = ("out", "dq", "dk", "dv", "dbias")
    for b, length, w in ((1, 2048, 2048), (1, 4096, 2048)):
        q, k, v, bias, do = make_inputs(b, length, seed=3)
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        f32 = lambda x: x.astype(jnp.float32)

        def ref(q, k, v, bias):
            return dynamic_mask_attention_reference(f32(q), f32(k), f32(v), bias, keep_window_size=w,
                                                    query_positions=pos, key_positions=pos)

        impls = {"ref": ref}
        impls["wmjax"] = lambda q, k, v, bias: dynamic_mask_attention_pallas(
            q, k, v, bias, keep_window_size=w, query_positions=pos, key_positions=pos, interpret=False)
        if length <= w and "tokamax" not in skip:
            impls["tokamax"] = tokamax_fns()[0]
        out = {}
        for name, fn in impls.items():
            def f(q, k, v, bias, fn=fn):
                o, vjp = jax.vjp(fn, q, k, v, bias)
                return (o,) + vjp(do.astype(o.dtype))
            try:
                out[name] = jax.device_get(jax.jit(f)(q, k, v, bias))
            except Exception:
                traceback.print_exc()
        for name in out:
            if name != "ref":
                print(f"bf16 check b{b} L{length} w{w} {name} vs f32 reference:",
                      {n: f"{rel(a, e):.1e}" for n, a, e in zip(names, out[name], out["ref"])}, flush=True)


def sweep(shapes):
    """Per-kernel breakdown (pre-pass, fwd kernel, bwd kernels) for tile variants of the wmjax kernel (fields of
    the tuned default config for the shape, through `pallas_kernels.dmattn.tuning.override`)."""
    interpret = dict(interpret=True) if jax.default_backend() == "cpu" else {}  # interpret: CPU smoke runs only
    variants = {"default": {}, "fwd bk128": dict(block_k=128), "dq bq128": dict(block_q_dq=128),
                "dkv bk128": dict(block_k_dkv=128), "dkv bq32": dict(block_q_dkv=32)}
    for shp in shapes.split(","):
        b, length = map(int, shp.split("x"))
        q, k, v, bias, do = make_inputs(b, length)
        valid = jnp.ones((b, length), bool)
        for name, fields in variants.items():
            with tuning.override(**fields, **interpret):
                cfg = tuning.default_config(D, q.dtype, dense=length <= W)
            try:
                cap = _cap(W)
                prep = jax.jit(lambda bias, cfg=cfg: prepare_mask(bias, valid, W, cfg))
                aux = prep(bias)
                fwd = jax.jit(lambda q, k, v, bias, aux, cfg=cfg: flash_forward(
                    q, k, v, bias, aux["e"], aux.get("lists_fwd"), aux.get("counts_fwd"), scale=D ** -0.5,
                    cap=cap, cfg=cfg))
                o, lse = fwd(q, k, v, bias, aux)
                bwd = jax.jit(lambda q, k, v, bias, aux, o, lse, do, cfg=cfg: flash_backward(
                    q, k, v, bias, aux["e"], o, lse, do, aux.get("lists_dq"), aux.get("counts_dq"), aux.get("perm"),
                    scale=D ** -0.5, cap=cap, cfg=cfg))
                tp = time_jax(prep, (bias,)) if length > W else 0.0
                tf_ = time_jax(fwd, (q, k, v, bias, aux))
                tb = time_jax(bwd, (q, k, v, bias, aux, o, lse, do))
                print(f"  sweep b{b} L{length} {name:14s} prepass {tp:7.3f}  fwd kernel {tf_:7.3f}  bwd (delta+dq+dkv)"
                      f" {tb:7.3f} ms", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  sweep b{b} L{length} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def _kcfg(fwd=None, dq=None, dkv=None, **kw):
    """DmattnConfig fields for (block_q, block_k, warps, stages) per kernel; dkv is (block_q_dkv, block_k_dkv, ...)."""
    upd = dict(kw)
    if fwd:
        upd.update(block_q=fwd[0], block_k=fwd[1], num_warps_fwd=fwd[2], num_stages_fwd=fwd[3])
    if dq:
        upd.update(block_q_dq=dq[0], block_k_dq=dq[1], num_warps_dq=dq[2], num_stages_dq=dq[3])
    if dkv:
        upd.update(block_q_dkv=dkv[0], block_k_dkv=dkv[1], num_warps_dkv=dkv[2], num_stages_dkv=dkv[3])
    return upd


def tune(shapes, w_dense=True):
    """Per-kernel GPU times (jax.profiler, bench/kernel_profile.py) of wmjax fwd+bwd for config variants; each variant
    sets the fwd, dq and dk/dv tiles together (independent kernels, so each column is read on its own) over the
    tuned default of the shape (`pallas_kernels.dmattn.tuning.override`)."""
    variants = {
        "cur": _kcfg(),
        "v1": _kcfg(fwd=(64, 64, 4, 3), dq=(64, 64, 4, 3), dkv=(64, 64, 4, 2)),
        "v2": _kcfg(fwd=(128, 64, 8, 2), dq=(128, 64, 8, 2), dkv=(64, 128, 8, 2)),
        "v3": _kcfg(fwd=(128, 64, 8, 3), dq=(128, 64, 8, 3), dkv=(64, 128, 8, 3)),
        "v4": _kcfg(fwd=(128, 128, 8, 2), dq=(128, 128, 8, 2), dkv=(128, 128, 8, 2)),
        "v5": _kcfg(fwd=(128, 64, 4, 2), dq=(64, 32, 4, 2), dkv=(32, 128, 8, 2)),
        "v6": _kcfg(fwd=(64, 32, 4, 2), dq=(32, 64, 4, 2), dkv=(128, 64, 8, 2)),
        "v7": _kcfg(fwd=(64, 128, 4, 2), dq=(64, 128, 4, 2), dkv=(32, 64, 4, 3)),
        # sparse-path (L > w) candidates; s1 (H100 2026-11-23: 1.624 vs cur 1.963 ms at b2 L8192) became the
        # default, so "cur" now equals s1; g1, p1, p2 not yet measured
        "s0": _kcfg(dkv=(64, 64, 4, 3)),  # the sparse default before that measurement
        "s1": _kcfg(dkv=(64, 64, 4, 2)),
        "s2": _kcfg(dkv=(64, 128, 8, 2)),
        "g1": _kcfg(fwd=(128, 64, 8, 3), dkv=(64, 64, 4, 2)),
        "p1": _kcfg(expiry_block_j=128),
        "p2": _kcfg(expiry_block_x=512, list_chunk=1024),
    }
    for shp in shapes.split(","):  # "4x2048" (all variants) or "16x2048=cur+f2" (those named)
        shp, _, only = shp.partition("=")
        b, length = map(int, shp.split("x"))
        w = length if (w_dense or length <= W) else W
        q, k, v, bias, do = make_inputs(b, length)
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (b, length))
        names = list(variants) if length <= W or w_dense else ["cur", "s0"]
        if only:
            names = only.split("+")
        first = None
        for name in names:
            fields = variants[name]

            def fb(q, k, v, bias, do, fields=fields):
                f = lambda *a: dynamic_mask_attention_pallas(*a, keep_window_size=w, query_positions=pos,
                                                             key_positions=pos, interpret=False)
                with tuning.override(**fields):  # read while jax.jit traces this function
                    out, vjp = jax.vjp(f, q, k, v, bias)
                    return (out,) + vjp(do)

            try:
                f = jax.jit(fb)
                rows = kernel_table(lambda: f(q, k, v, bias, do), iters=3)
                tot = sum(r["total_ms"] for r in rows)
                ks = {}
                for r in rows:
                    nm = r["name"]
                    key = next((t for t in ("bwd_dkv", "bwd_dq", "fwd", "key_expiry", "query_block_lists")
                                if "dmattn_" + t in nm), None)
                    key = key or ("sort" if "sort" in nm.lower() else "other")
                    ks[key] = ks.get(key, 0.0) + r["total_ms"]
                wall = time_jax(f, (q, k, v, bias, do), n=10, trials=5)
                got = jax.device_get(f(q, k, v, bias, do))
                first = got if first is None else first  # every variant must give the first one's out and grads
                dev = max(rel(a, e) for a, e in zip(got, first))
                print(f"  tune b{b} L{length} w{w} {name:8s} wall {wall:7.3f} | vs {names[0]} {dev:.1e} | "
                      f"gpu {tot:7.3f} | " + " ".join(f"{k_} {v_:.3f}" for k_, v_ in
                                                      sorted(ks.items(), key=lambda x: -x[1])), flush=True)
                if name == "cur" and length > W:
                    for r in rows[:14]:
                        print(f"      {r['total_ms']:7.3f} ms x{r['count']:.0f}  {r['name'][:100]}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  tune b{b} L{length} {name}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4x2048,2x8192,1x32768")
    ap.add_argument("--skip", default="")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--sweep", default="", help="shapes for the per-kernel config sweep, e.g. 4x2048,2x8192")
    ap.add_argument("--tune", default="", help="shapes for the per-kernel profile of config variants (L <= w: dense)")
    ap.add_argument("--tune-sparse", default="", help="shapes (L > w) for the sparse per-kernel profile")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print("jax", jax.__version__, "device", jax.devices()[0].device_kind, flush=True)
    try:
        gpu_f32_check()
        bf16_check(skip)
    except Exception:
        traceback.print_exc()
    if args.sweep:
        sweep(args.sweep)
    if args.tune:
        tune(args.tune)
    if args.tune_sparse:
        tune(args.tune_sparse, w_dense=False)
    if args.check_only:
        return
    have_torch = False
    if not ({"hf", "fdm"} <= skip):
        try:
            import torch
            have_torch = torch.cuda.is_available()
            print("torch", torch.__version__, flush=True)
        except Exception:
            traceback.print_exc()

    rows = []
    for shp in args.shapes.split(","):
        b, length = map(int, shp.split("x"))
        flop_fwd = 4.0 * b * H * length * length * D / 2
        q, k, v, bias, do = make_inputs(b, length)
        res = {}
        t = {}

        def record(name, fwd_ms, fb_ms):
            t[name] = (fwd_ms, fb_ms)
            print(f"  b{b} L{length} {name:28s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fb_ms:8.3f} ms", flush=True)

        # wmjax
        try:
            f, fb = wmjax_fns(length, W)
            res["wmjax"] = jax.device_get(fb(q, k, v, bias, do))
            record("wmjax pallas (w/ pre-pass)", time_jax(f, (q, k, v, bias)), time_jax(fb, (q, k, v, bias, do)))
            if length == 32768:
                try:
                    ma = fb.lower(q, k, v, bias, do).compile().memory_analysis()
                    print(f"  memory_analysis fwd+bwd L{length}: temp {ma.temp_size_in_bytes / 2**20:.1f} MiB, "
                          f"args {ma.argument_size_in_bytes / 2**20:.1f} MiB, out {ma.output_size_in_bytes / 2**20:.1f}"
                          f" MiB; one [L, L] f32 = {length * length * 4 / 2**20:.0f} MiB", flush=True)
                except Exception:
                    traceback.print_exc()
            if length > W:  # the same kernel without top-k (w = L): dense causal + key bias, no pre-pass
                fd, fbd = wmjax_fns(length, length)
                res["wmjax_dense"] = jax.device_get(fbd(q, k, v, bias, do))
                record("wmjax pallas dense (w=L)", time_jax(fd, (q, k, v, bias)), time_jax(fbd, (q, k, v, bias, do)))
        except Exception:
            traceback.print_exc()
        # tokamax
        if "tokamax" not in skip:
            try:
                f, fb = tokamax_fns()
                res["tokamax"] = jax.device_get(fb(q, k, v, bias, do))
                record("tokamax mosaic causal+keybias", time_jax(f, (q, k, v, bias)),
                       time_jax(fb, (q, k, v, bias, do)))
            except Exception:
                traceback.print_exc()
        # torch peers
        if have_torch:
            import torch
            tq = to_torch(q, torch.bfloat16)
            tk = to_torch(k, torch.bfloat16)
            tv = to_torch(v, torch.bfloat16)
            tb = to_torch(bias)
            tdo = to_torch(do, torch.bfloat16)
            if "hf" not in skip and length > 8192:
                print(f"  b{b} L{length} HF path skipped: its dense masks need > 80 GB (first run 2026-11-23: CUDA OOM "
                      "allocating 12 GiB in the topk scatter with 70 GiB in use)", flush=True)
            elif "hf" not in skip:
                try:
                    build, hf = hf_fns(W)
                    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (tq, tk, tv))
                    doh = tdo.transpose(1, 2).contiguous()
                    leaves = [x.detach().requires_grad_(True) for x in (qh, kh, vh, tb)]

                    def hf_fb():
                        for x in leaves:
                            x.grad = None
                        o = hf(*leaves)
                        o.backward(doh)
                        return o

                    o = hf_fb()
                    o = o.detach()
                    res["hf"] = (o.transpose(1, 2).float().cpu().numpy(),
                                 leaves[0].grad.transpose(1, 2).float().cpu().numpy(),
                                 leaves[1].grad.transpose(1, 2).float().cpu().numpy(),
                                 leaves[2].grad.transpose(1, 2).float().cpu().numpy(),
                                 leaves[3].grad.float().cpu().numpy())
                    with torch.no_grad():
                        tm = time_torch(lambda: build(tb, length))
                        tf_ = time_torch(lambda: hf(qh, kh, vh, tb))
                    tfb = time_torch(hf_fb)
                    print(f"  b{b} L{length} HF mask build alone {tm:.3f} ms", flush=True)
                    record("HF mask build + SDPA", tf_, tfb)
                except Exception:
                    traceback.print_exc()
                finally:
                    leaves = None
                    torch.cuda.empty_cache()
            if "fdm" not in skip and length <= 8192:
                try:
                    build, _ = hf_fns(W)
                    fdm = fdm_fn(W)
                    with torch.no_grad():
                        add = build(tb, length)  # (b, h, L, L) bf16: bias where kept, min elsewhere
                        mask = (add > torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
                        fb_bias = torch.where(mask > 0, add, torch.zeros((), dtype=add.dtype, device=add.device))
                    del add
                    kk = tk.repeat_interleave(H // G, dim=2).contiguous()
                    vv = tv.repeat_interleave(H // G, dim=2).contiguous()
                    leaves = [x.detach().requires_grad_(True) for x in (tq, kk, vv)]
                    fb_bias = fb_bias.requires_grad_(True)

                    def fdm_fb():
                        for x in leaves + [fb_bias]:
                            x.grad = None
                        o = fdm(*leaves, mask, fb_bias)
                        o.backward(tdo)
                        return o

                    o = fdm_fb()
                    res["fdm_out"] = o.detach().float().cpu().numpy()
                    with torch.no_grad():
                        tf_ = time_torch(lambda: fdm(tq, kk, vv, mask, fb_bias))
                    tfb = time_torch(fdm_fb)
                    record("flash-dmattn 1.2.2 triton", tf_, tfb)
                except Exception:
                    traceback.print_exc()
                finally:
                    leaves = mask = fb_bias = None
                    torch.cuda.empty_cache()
            elif "fdm" not in skip:
                print(f"  b{b} L{length} flash-dmattn skipped: needs dense (b, h, L, L) bf16 mask and bias "
                      f"({2 * b * H * length * length * 2 / 2**30:.0f} GiB) and ~16x its 8k time (~1.5 s fwd+bwd)",
                      flush=True)
        # cross-checks
        names = ("out", "dq", "dk", "dv", "dbias")
        if "wmjax" in res and "hf" in res:
            print("  check wmjax vs HF (top-k):", {n: f"{rel(a, e):.1e}" for n, a, e in
                                                 zip(names, res["wmjax"], res["hf"])}, flush=True)
        if "fdm_out" in res and "hf" in res:
            print(f"  check flash-dmattn vs HF out: {rel(res['fdm_out'], res['hf'][0]):.1e}", flush=True)
        if "tokamax" in res:
            dense = res.get("wmjax_dense", res.get("wmjax"))
            if dense is not None:
                print("  check tokamax vs wmjax dense (no top-k):", {n: f"{rel(a, e):.1e}" for n, a, e in
                                                                     zip(names, dense, res["tokamax"])}, flush=True)
        rows.append((b, length, flop_fwd, t))
        res = None

    print("\n| shape | implementation | fwd ms | fwd TF/s* | fwd+bwd ms | fwd+bwd TF/s* "
          "| wmjax speedup fwd / fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for b, length, flop, t in rows:
        mine = t.get("wmjax pallas (w/ pre-pass)")
        for name, (tf_, tfb) in t.items():
            sp = f"{tf_ / mine[0]:.2f}x / {tfb / mine[1]:.2f}x" if mine else "-"
            print(f"| b{b} L{length} | {name} | {tf_:.3f} | {flop / tf_ / 1e9:.0f} | {tfb:.3f} | "
                  f"{3.5 * flop / tfb / 1e9:.0f} | {sp} |")
    print("* dense-causal FLOP convention (fwd 4 b h L^2 d / 2; fwd+bwd 3.5x)")


if __name__ == "__main__":
    main()
