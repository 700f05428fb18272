"""Benchmark: wmjax Pallas SSD vs mamba_ssm's Triton ``mamba_chunk_scan_combined``, in one process.

Usage (GPU machine; mamba_ssm's Triton kernels from ../shared/tools/fetch_anchors.sh, carried as .anchors):
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.anchors/py:. python bench/ssd.py [--check] [--json out.json]
CPU smoke test of the script itself (tiny shapes, Pallas interpret mode, no peer):
    python bench/ssd.py --cpu-smoke

Shapes: (b=4, L=2048) and (b=2, L=8192); h=24, p=64, n=128, g=1 (the Mamba-2 benchmark shape) and Cheems'
h=8, g=8, p=n=128; chunk 256; bf16 x/B/C (dt, A f32). Forward and forward+backward (grads of x, dt, A, B, C).
Timing: jitted function, warm-up, then the median over repetitions of (n back-to-back calls, one sync) / n;
the peer is timed the same way with torch.cuda.synchronize. Floors: essential bytes (inputs read once,
outputs written once) / measured copy bandwidth, and minimal matmul FLOPs / measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import copy_bandwidth, jax_sync, rel, time_fn  # noqa: E402
from pallas_kernels.ssd import kernels as Kn  # noqa: E402
from pallas_kernels.ssd import ops as O  # noqa: E402
from pallas_kernels.ssd import ssd_pallas, tuning  # noqa: E402
from pallas_kernels.ssd.reference import ssd_chunked, ssd_naive  # noqa: E402

# wmjax kernel variants timed per shape: `pallas_kernels.ssd.tuning.override` fields (the first is the tuned
# default; the table reports the best). Measured on H100 and dropped (docs/benchmarks-history.md, SSD): block_t 32
# (25-45 % slower), block_t 128 / 8 warps and 8 forward warps (slower at g=1, +-7 % for Cheems).
VARIANTS = [
    {},
    {"bwd_heads": 4},
    {"num_stages_scan_fwd": 3, "num_stages_states_fwd": 3},
]

CONFIGS = [
    # name, b, L, h, p, g, n
    ("mamba2 b4 L2048", 4, 2048, 24, 64, 1, 128),
    ("mamba2 b2 L8192", 2, 8192, 24, 64, 1, 128),
    ("cheems b4 L2048", 4, 2048, 8, 128, 8, 128),
    ("cheems b2 L8192", 2, 8192, 8, 128, 8, 128),
]
Q = 256



def make_inputs(seed, b, L, h, p, g, n, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, L, h, p)).astype(np.float32)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (b, L, h))).astype(np.float32)
    A = (-rng.uniform(1.0, 16.0, (h,))).astype(np.float32)
    B = rng.standard_normal((b, L, g, n)).astype(np.float32)
    C = rng.standard_normal((b, L, g, n)).astype(np.float32)
    dy = rng.standard_normal((b, L, h, p)).astype(np.float32)
    return dict(x=x, dt=dt, A=A, B=B, C=C, dy=dy)


def floors(b, L, h, p, g, n, bw, peak):
    """Essential bytes and minimal matmul FLOPs (causal intra-chunk pairs, CB once per group)."""
    tok = b * L
    e = 2  # bf16
    fwd_bytes = tok * (e * h * p + 2 * e * g * n + 4 * h + e * h * p)          # x, B, C, dt in; y out
    bwd_bytes = tok * (e * h * p * 2 + 2 * e * g * n + 4 * h                   # x, dy, B, C, dt in
                       + e * h * p + 2 * e * g * n + 4 * h)                     # dx, dB, dC, ddt out
    pairs = Q / 2
    fwd_flops = tok * (h * (4 * p * n + pairs * 2 * p) + g * pairs * 2 * n)
    # bwd: chunk-state grads 4pn, inter dC/dH 4pn, per pair: W^T dy, dy x^T (2p each), G^T C, G B (2n each)
    bwd_flops = tok * (h * (8 * p * n + pairs * (4 * p + 4 * n)) + g * pairs * 2 * n)
    out = {}
    for name, by, fl in (("fwd", fwd_bytes, fwd_flops), ("fwd+bwd", fwd_bytes + bwd_bytes, fwd_flops + bwd_flops)):
        out[name] = dict(bytes=by, flops=fl, t_bytes=by / bw, t_flops=fl / peak, floor=max(by / bw, fl / peak))
    return out




def measure_ceilings():
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    bw = copy_bandwidth()
    m = jnp.asarray(np.random.default_rng(0).standard_normal((8192, 8192)), jnp.bfloat16)
    mm = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t, _ = time_fn(lambda: mm(m, m), jax_sync, n_inner=5, reps=5)
    peak = 2 * 8192 ** 3 / t
    del m
    return bw, peak


def correctness_check(interpret=False):
    """f32 kernels on this device vs the naive recurrence: forward, final state, all gradients."""
    print("== correctness (f32, Pallas on this device vs naive recurrence) ==")
    worst = 0.0
    cases = [((2, 300, 4, 64, 1, 128), dict()), ((1, 530, 8, 32, 2, 64), dict(D=True, z=True, h0=True, seg=True)),
             ((2, 256, 4, 128, 4, 128), dict(h0=True, seg=True))]
    for shape, opts in cases:
        b, L, h, p, g, n = shape
        rng = np.random.default_rng(b * L)
        arrs = {k: jnp.asarray(v) for k, v in make_inputs(L, *shape).items() if k != "dy"}
        kw = {}
        if opts.get("D"):
            kw["D"] = jnp.asarray(rng.standard_normal((h,)), jnp.float32)
        if opts.get("z"):
            kw["z"] = jnp.asarray(rng.standard_normal((b, L, h, p)), jnp.float32)
        if opts.get("h0"):
            kw["initial_state"] = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
        seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, L)), axis=1), jnp.int32) if opts.get("seg") else None
        ry = jnp.asarray(rng.standard_normal((b, L, h, p)), jnp.float32)
        rs = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)

        def loss(impl):
            def f(x, dt, A, B, C, kw):
                y, s = impl(x, dt, A, B, C, segment_ids=seg, **kw)
                return jnp.sum(y * ry) + jnp.sum(s * rs), (y, s)
            return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))

        pal = lambda *a, **k: ssd_pallas(*a, chunk_size=256, interpret=interpret, **k)  # noqa: E731
        args = (arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], kw)
        (g0, (y0, s0)) = loss(ssd_naive)(*args)
        (g1, (y1, s1)) = loss(pal)(*args)
        errs = {"y": rel(y1, y0), "state": rel(s1, s0)}
        for name, a0, a1 in zip(["dx", "ddt", "dA", "dB", "dC"], g0[:5], g1[:5]):
            errs[name] = rel(a1, a0)
        for k in kw:
            errs["d" + k] = rel(g1[5][k], g0[5][k])
        worst = max(worst, max(errs.values()))
        print(f"  {shape} {sorted(opts)}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print(f"  worst rel err {worst:.2e} -> {'PASS' if worst <= 1e-4 else 'FAIL'} (tolerance 1e-4)")
    return worst


def run_bench(configs, with_peer, interpret=False, json_path=None):
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}")
    if with_peer:
        import torch
        print(f"torch {torch.__version__}")
    bw, peak = measure_ceilings() if not interpret else (3.0e12, 6.0e14)
    print(f"measured ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")

    rows = []
    for cfg in configs:
        try:
            rows.append(bench_one(cfg, with_peer, interpret, bw, peak))
        except Exception as exc:  # keep the other shapes' numbers
            import traceback
            traceback.print_exc()
            print(f"FAILED {cfg[0]}: {type(exc).__name__}: {str(exc)[:2000]}")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(dict(device=dev.device_kind, jax=jax.__version__, bw=bw, peak=peak, rows=rows), fh,
                          indent=1)
    print_table(rows)
    return rows


def bench_one(cfg, with_peer, interpret, bw, peak):
    if with_peer:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    name, b, L, h, p, g, n = cfg
    if True:
        inp = make_inputs(0, b, L, h, p, g, n)
        bf = jnp.bfloat16
        jx = dict(x=jnp.asarray(inp["x"], bf), dt=jnp.asarray(inp["dt"]), A=jnp.asarray(inp["A"]),
                  B=jnp.asarray(inp["B"], bf), C=jnp.asarray(inp["C"], bf))
        jdy = jnp.asarray(inp["dy"], bf)

        args = (jx["x"], jx["dt"], jx["A"], jx["B"], jx["C"])
        fl = floors(b, L, h, p, g, n, bw, peak)
        res = dict(config=name, b=b, L=L, h=h, p=p, g=g, n=n, variants={})
        y_w = grads_w = y_ref = None
        best_f = best_fb = float("inf")
        for vi, var in enumerate(VARIANTS if not interpret else VARIANTS[:1]):
            def f_fwd(x, dt, A, B, C, var=var):
                with tuning.override(**var):  # read while jax.jit traces this function
                    return ssd_pallas(x, dt, A, B, C, chunk_size=Q, interpret=interpret)[0]

            fwd = jax.jit(f_fwd)

            @jax.jit
            def fwd_bwd(x, dt, A, B, C, dy, f_fwd=f_fwd):
                y, vjp = jax.vjp(f_fwd, x, dt, A, B, C)
                return y, vjp(dy)

            try:
                y_v, grads_v = fwd_bwd(*args, jdy)
                if vi == 0:
                    y_w, grads_w = y_v, grads_v
                    # accuracy vs an f32 chunked reference on the same (bf16-rounded) inputs
                    if b * L <= 8192:
                        up = [v.astype(jnp.float32) for v in args]
                        y_ref = jax.jit(lambda *a: ssd_chunked(*a, chunk_size=Q)[0])(*up)
                        res["wmjax_vs_f32ref"] = rel(y_w, y_ref)
                else:
                    res["variants"][str(VARIANTS[vi])] = dict(y_rel_vs_default=rel(y_v, y_w))
                t_f, _ = time_fn(lambda: fwd(*args), jax_sync)
                t_fb, _ = time_fn(lambda: fwd_bwd(*args, jdy), jax_sync)
            except Exception as exc:
                print(f"variant {VARIANTS[vi]} failed: {type(exc).__name__}: {str(exc)[:1500]}")
                if vi == 0:
                    raise
                continue
            res["variants"].setdefault(str(VARIANTS[vi]), {}).update(fwd_ms=t_f * 1e3, fwdbwd_ms=t_fb * 1e3)
            print(f"  {name} variant {VARIANTS[vi]}: fwd {t_f * 1e3:.3f} ms, fwd+bwd {t_fb * 1e3:.3f} ms", flush=True)
            best_f, best_fb = min(best_f, t_f), min(best_fb, t_fb)
            if vi == 0:
                res.update(default_fwd_ms=t_f * 1e3, default_fwdbwd_ms=t_fb * 1e3)
        t_f, t_fb = best_f, best_fb
        res.update(wmjax_fwd_ms=t_f * 1e3, wmjax_fwdbwd_ms=t_fb * 1e3)
        if with_peer:
            tdev = "cuda"
            tb = torch.bfloat16
            tx = torch.tensor(inp["x"], device=tdev).to(tb).requires_grad_()
            tdt = torch.tensor(inp["dt"], device=tdev).requires_grad_()
            tA = torch.tensor(inp["A"], device=tdev).requires_grad_()
            tB = torch.tensor(inp["B"], device=tdev).to(tb).requires_grad_()
            tC = torch.tensor(inp["C"], device=tdev).to(tb).requires_grad_()
            tdy = torch.tensor(inp["dy"], device=tdev).to(tb)

            def m_fwd():
                with torch.no_grad():
                    return mamba_chunk_scan_combined(tx, tdt, tA, tB, tC, chunk_size=Q)

            def m_fwd_bwd():
                y = mamba_chunk_scan_combined(tx, tdt, tA, tB, tC, chunk_size=Q)
                return y, torch.autograd.grad(y, (tx, tdt, tA, tB, tC), tdy)

            tsync = lambda r: torch.cuda.synchronize()  # noqa: E731
            y_m, grads_m = m_fwd_bwd()
            to_np = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
            res["y_rel_vs_mamba"] = rel(y_w, to_np(y_m))
            for nm, gw, gm in zip(["dx", "ddt", "dA", "dB", "dC"], grads_w, grads_m):
                res[f"{nm}_rel_vs_mamba"] = rel(gw, to_np(gm))
            if "wmjax_vs_f32ref" in res:
                res["mamba_vs_f32ref"] = rel(to_np(y_m), y_ref)
            t_mf, _ = time_fn(m_fwd, tsync)
            t_mfb, _ = time_fn(m_fwd_bwd, tsync)
            res.update(mamba_fwd_ms=t_mf * 1e3, mamba_fwdbwd_ms=t_mfb * 1e3)
            del tx, tdt, tA, tB, tC, tdy, y_m, grads_m
            torch.cuda.empty_cache()
        for k, v in fl.items():
            res[f"floor_{k}_us"] = v["floor"] * 1e6
            res[f"floor_{k}_bytes_us"] = v["t_bytes"] * 1e6
            res[f"floor_{k}_flops_us"] = v["t_flops"] * 1e6
            res[f"{k}_bytes"] = v["bytes"]
            res[f"{k}_flops"] = v["flops"]
        print(json.dumps(res), flush=True)
        return res


def print_table(rows):
    print()
    hdr = (f"| {'config':16s} | pass    | wmjax ms | mamba ms | ratio | wmjax TFLOP/s | wmjax GB/s | floor us "
           f"(bytes/flops) | floor/wmjax |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        for k, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
            tw = r[f"wmjax_{key}_ms"]
            tm = r.get(f"mamba_{key}_ms", float("nan"))
            fl_us = r[f"floor_{k}_us"]
            print(f"| {r['config']:16s} | {k:7s} | {tw:8.3f} | {tm:8.3f} | {tw / tm:5.2f} | "
                  f"{r[f'{k}_flops'] / tw / 1e9:13.1f} | {r[f'{k}_bytes'] / tw / 1e6:10.0f} | "
                  f"{fl_us:6.1f} ({r[f'floor_{k}_bytes_us']:.1f}/{r[f'floor_{k}_flops_us']:.1f}) | "
                  f"{fl_us / 1e3 / tw:11.2f} |")


def breakdown(cfg, interpret=False):
    """Times each stage of the wmjax forward/backward separately at one shape (synthetic stage inputs)."""
    name, b, L, h, p, g, n = cfg
    hg, T, nc = h // g, 64, L // Q
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    x = jnp.asarray(rng.standard_normal((b, L, h, p)), bf)
    B = jnp.asarray(rng.standard_normal((b, L, g, n)), bf)
    C = jnp.asarray(rng.standard_normal((b, L, g, n)), bf)
    dt = jnp.asarray(rng.uniform(1e-3, 0.1, (b, h, L)), jnp.float32)
    cs = jnp.cumsum(-dt.reshape(b, h, nc, Q), axis=-1).reshape(b, h, L)
    e = jnp.exp(cs)
    S = jnp.asarray(rng.standard_normal((b, h, nc, p, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((b, L, h, p)), bf)
    cs_end = cs.reshape(b, h, nc, Q)[..., -1]
    keep = jnp.ones((b, nc), bool)
    h0 = jnp.zeros((b, h, p, n), jnp.float32)
    hs = O._heads_per_program(hg, 8)
    cfgk = dict(hg=hg, Q=Q, T=T, interpret=interpret)
    w4 = dict(num_warps=4, num_stages=2)
    w8 = dict(num_warps=8 if max(p, n) >= 128 else 4, num_stages=2)
    sp = lambda S_, ce_, h0_: O._state_passing(S_, ce_, keep, h0_, interpret)  # noqa: E731
    stages = {
        "states_fwd": (lambda x_, B_, e_: Kn.chunk_states_fwd(x_, B_, e_, **cfgk, **w4), (x, B, e)),
        "state_passing": (sp, (S, cs_end, h0)),
        "scan_fwd": (lambda *a: Kn.chunk_scan_fwd(*a, None, **cfgk, **w4), (x, B, C, dt, cs, e, S)),
        "state_passing vjp": (lambda S_, ce_, h0_: jax.vjp(sp, S_, ce_, h0_)[1]((S_, h0_)), (S, cs_end, h0)),
        "scan_bwd": (lambda *a: Kn.chunk_scan_bwd(*a[:7], None, a[7], **cfgk, hs=hs, **w8),
                     (x, B, C, dt, cs, e, S, dy)),
        "scan_bwd hs=1": (lambda *a: Kn.chunk_scan_bwd(*a[:7], None, a[7], **cfgk, hs=1, **w8),
                          (x, B, C, dt, cs, e, S, dy)),
        "states_bwd": (lambda x_, B_, e_, S_: Kn.chunk_states_bwd(x_, B_, e_, S_, **cfgk, hs=hs, **w8),
                       (x, B, e, S)),
    }
    print(f"== breakdown {name} (hs={hs}) ==")
    for k, (f, fargs) in stages.items():
        try:
            jf = jax.jit(f)
            t, _ = time_fn(lambda: jf(*fargs), jax_sync)
            print(f"  {k:24s} {t * 1e3:8.3f} ms")
        except Exception as exc:
            print(f"  {k:24s} FAILED {type(exc).__name__}: {str(exc)[:300]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="f32 correctness check on the device first")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--only", default=None, help="substring filter on config names")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="time each stage at the b2 L8192 shapes first")
    ap.add_argument("--nvar", type=int, default=len(VARIANTS), help="time only the first NVAR kernel variants")
    a = ap.parse_args()
    del VARIANTS[a.nvar:]
    if a.cpu_smoke:
        worst = correctness_check(interpret=True) if a.check else 0.0
        run_bench([("smoke", 1, 512, 2, 64, 1, 128), ("smoke-g", 1, 512, 2, 128, 2, 128)], with_peer=False,
                  interpret=True)
        return
    if a.check:
        correctness_check()
    if a.breakdown:
        for c in CONFIGS:
            if "L8192" in c[0]:
                breakdown(c)
    cfgs = [c for c in CONFIGS if a.only is None or a.only in c[0]]
    run_bench(cfgs, with_peer=not a.no_peer, json_path=a.json)


if __name__ == "__main__":
    main()
