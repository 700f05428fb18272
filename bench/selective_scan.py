"""Benchmark: wmjax Pallas selective scan (OTCE's Mamba-1 mixer) vs mamba_ssm's CUDA selective scan, in one process.

Usage (GPU machine):
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.anchors/py:. python bench/selective_scan.py [--json out.json]
The peer, first found wins: mamba_ssm's ``selective_scan_fn`` (a full mamba_ssm install); the bare CUDA extension
``selective_scan_cuda`` (built by bench/build_mamba_cuda.py into .anchors/mamba_cuda/build, called with the
fwd / bwd arguments mamba_ssm's autograd function uses); mamba_ssm's torch ``selective_scan_ref`` (a python loop
over L); none. The jnp definition (``lax.scan`` over L) is timed too (``--no-ref`` skips it).
CPU smoke test of the script itself (tiny shapes, Pallas interpret mode, no peer):
    python bench/selective_scan.py --cpu-smoke

Shapes: b2 L8192 E2048 N16 (Mamba-1 large), OTCE-160M's mixer b16 L2048 E512 N64 (configs/otce-160m.yaml: E = the
hidden size, one micro-batch of 640 / 40 sequences), and b4 L2048 E768 at N16 and N64. bf16 x, dt, z, B, C; f32 A,
D, dt_bias; softplus on; no packing / initial state (the peer has neither). Forward and forward+backward (grads of
x, dt, A, B, C, D, z, dt_bias). Correctness vs the jnp definition (f32, every gradient) runs first on the device.
Timing: jitted function, warm-up, median over repetitions of (n back-to-back calls, one sync) / n; torch the same
with torch.cuda.synchronize.

Floors (printed per shape):
  bytes: fwd reads x, dt, z (2 B each per channel) and B, C (2 B per state) once and writes y:
         8 E + 4 N bytes per token; fwd+bwd adds the backward's essential traffic (reads x, dt, z, dy, B, C; writes
         dx, ddt, dz, dB, dC): + 14 E + 8 N -> 22 E + 12 N bytes per token.
         b2 L8192 E2048 N16: 269 MB fwd (~90 us at 3 TB/s), 740 MB fwd+bwd (~0.25 ms).
  exp:   the scan needs exp(delta A) for every (token, channel, state): b L E N per pass (the kernels compute it once
         forward and once backward, where the adjoint scan reuses the recomputed decays). At 16 MUFU ops / clock / SM
         (132 SMs, 1.755 GHz: 3.7e12 /s) b2 L8192 E2048 N16 needs 0.145 ms per pass.
History: the first kernel (token-by-token walk, K = 16 tokens unrolled in Python) measured on an H200 at
b2 L8192 E2048 N16 bf16: fwd 6.98 ms, fwd+bwd 21.2 ms, and minutes of Triton compile.
Prediction and measurements of the current kernels ([T, N1, BE, N2] tiles, sequence-parallel parts): docs/KERNELS.md,
Selective scan; the sweeps: docs/benchmarks-history.md, Session 9.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.timing import copy_bandwidth, jax_sync, rel, time_fn  # noqa: E402
from pallas_kernels.selective_scan import selective_scan_pallas, selective_scan_ref, tuning  # noqa: E402

# wmjax kernel variants per state-size class: `pallas_kernels.selective_scan.tuning.override` fields (the first is
# the default; the table reports the best and the default).
VARIANTS_N16 = [
    {},          # T8; forward N2 4, BE 16 at 1 warp, parts; backward N2 8, BE 8 at 1 warp, 2 sub-blocks, parts
    # forward and backward kernels are independent, so a variant pairs one of each (--profile: per kernel).
    # forward without prefetch: 128 registers (16 warps per SM; 167 with it, 12), 3% fewer static instructions.
    # backward: one channel a thread (BE 4), 4 groups of it: 168 registers (12 warps per SM, not 8), 34% more
    # executed instructions per element (docs/KERNELS.md), the same 16 channels a program
    {"prefetch_fwd": False, "block_e_bwd": 4, "sub_blocks_bwd": 1, "groups_bwd": 4},
    {"block_e_bwd": 4, "sub_blocks_bwd": 1, "groups_bwd": 8},               # 32 channels: half the partials
    {"part_programs_fwd": 2048},                                          # half the forward's parts
    {"scatter_bwd": False},                                               # backward: Triton's butterfly sums
    {"prefetch_bwd": True},
]
VARIANTS_N64 = [
    {},          # T8, N2 16; forward BE 8 at 4 warps, no parts; backward BE 2 at 1 warp, 2 sub-blocks, parts
    # forward and backward kernels are independent, so a variant pairs one of each (--profile: per kernel).
    # forward two channels a thread (BE 16): 64 elements a thread, 11.4 static instructions each (default 14.5),
    # 128 registers: b16 E512's 512 programs of 4 warps are one wave at 16 warps per SM. Backward in chunks of 4
    # (the forward saving every 4 tokens from inside its chunks of 8) at two channels a thread (BE 4, S 2): 23.2
    # executed instructions per element (default 25.0) at the same 255 registers, half the dB / dC partials, twice
    # the saved states; P = 1 at b16 E512 (1024 programs, one wave, no part pass)
    {"block_e_fwd": 16, "chunk_bwd": 4, "block_e_bwd": 4, "part_programs_bwd": 1024},
    {"block_e_fwd": 16, "part_programs_bwd": 2048},   # backward: P = 1 at b16 E512 (2048 programs, no part pass)
    # forward at one warp a program (BE 2): its layout conversions' barriers no longer hold 4 warps together (108
    # registers without prefetch); backward as the first variant with its default parts (P = 4 at b16 E512)
    {"num_warps_fwd": 1, "block_e_fwd": 2, "prefetch_fwd": False, "chunk_bwd": 4, "block_e_bwd": 4},
    # channel groups (a dynamic loop per chunk, carries in memory): the dB / dC partials K S BE channels apart
    {"groups_bwd": 16, "sub_blocks_bwd": 1, "part_programs_bwd": 1024},   # 32 channels: an eighth, P = 4
    {"groups_bwd": 4, "sub_blocks_bwd": 1, "part_programs_bwd": 1024},    # 8 channels: half, P = 1
    {"lanes_n_bwd": 32, "block_e_bwd": 2},    # backward: all lanes on the state, channel sums in a thread (255 regs)
    {"part_programs_bwd": 8192},              # twice the backward's parts at b16 E512
    {"chunk": 4, "block_e_bwd": 4},           # session 13's T = 4 both ways (forward 1.103 ms, fwd+bwd 3.878)
    {"prefetch_bwd": True},
    {"scatter_bwd": False},
    {"lanes_n_fwd": 8},       # forward N2 8: 10.1 static instructions per element, 144 registers, 12 warps per SM
]

CONFIGS = [
    # name, b, L, E, N, variants, how many of them to time (the big shape: fewer, to keep the run short)
    ("mamba1 b2 L8192 E2048 N16", 2, 8192, 2048, 16, VARIANTS_N16, 3),
    # OTCE-160M's mixer (configs/otce-160m.yaml: E = hidden 512, N 64, micro-batch 640 / 40 = 16 of 2048 tokens)
    ("otce-160m b16 L2048 E512 N64", 16, 2048, 512, 64, VARIANTS_N64, 5),
    ("b4 L2048 E768 N16", 4, 2048, 768, 16, VARIANTS_N16, 1),
    ("b4 L2048 E768 N64", 4, 2048, 768, 64, VARIANTS_N64, 2),
]
EXP_RATE = 132 * 16 * 1.755e9   # nominal H100 SXM MUFU throughput, exp / s



def make_inputs(seed, b, L, E, N):
    """numpy f32 arrays in wmjax layouts (x, dt, z, dy [b, L, E]; B, C [b, L, N]; A [E, N]; D, dt_bias [E])."""
    rng = np.random.default_rng(seed)
    dt_init = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (E,)))
    return dict(
        x=rng.standard_normal((b, L, E)).astype(np.float32),
        dt=(rng.standard_normal((b, L, E)) * 0.5).astype(np.float32),
        A=(-np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1))),           # S4D-real init
        B=rng.standard_normal((b, L, N)).astype(np.float32),
        C=rng.standard_normal((b, L, N)).astype(np.float32),
        D=np.ones((E,), np.float32),
        z=rng.standard_normal((b, L, E)).astype(np.float32),
        dt_bias=(dt_init + np.log(-np.expm1(-dt_init))).astype(np.float32),    # inverse softplus
        dy=rng.standard_normal((b, L, E)).astype(np.float32),
    )


def floors(b, L, E, N):
    tok = b * L
    fwd_bytes = tok * (8 * E + 4 * N)
    fb_bytes = tok * (22 * E + 12 * N)
    exps = tok * E * N
    return {"fwd": dict(bytes=fwd_bytes, t_exp=exps / EXP_RATE),
            "fwd+bwd": dict(bytes=fb_bytes, t_exp=2 * exps / EXP_RATE)}





# ------------------------------------------------------------------------------------------------------------
# peers
# ------------------------------------------------------------------------------------------------------------
def find_peer():
    """(name, fwd(tensors) -> y, fwd_bwd(tensors) -> (y, grads)) of the first importable peer, or None. Tensors in
    mamba_ssm layouts: u, delta, z [b, E, L]; B, C [b, N, L]; A [E, N]; D, delta_bias [E] f32."""
    try:
        import torch
    except ImportError:
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        def f(t):
            return selective_scan_fn(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"],
                                     delta_softplus=True)
        return "mamba_ssm selective_scan_fn (CUDA)", *_autograd_pair(f)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not this peer"
        print(f"peer: mamba_ssm selective_scan_fn not importable ({type(exc).__name__}: {str(exc)[:200]})")
    try:
        sys.path.insert(0, os.path.join(ROOT, ".anchors", "mamba_cuda", "build"))
        import selective_scan_cuda as ssc

        # the extension takes variable B, C as [b, groups, N, L] (mamba_ssm's interface adds the group axis)
        def fwd(t):
            with torch.no_grad():
                out, _, *rest = ssc.fwd(t["x"], t["dt"], t["A"], t["B"][:, None], t["C"][:, None], t["D"], t["z"],
                                        t["dt_bias"], True)
            return rest[0]

        def fwd_bwd(t):
            # what mamba_ssm's SelectiveScanFn does: fwd keeps (out, x = chunk states), bwd recomputes out_z
            with torch.no_grad():
                B, C = t["B"][:, None], t["C"][:, None]
                out, xs, *rest = ssc.fwd(t["x"], t["dt"], t["A"], B, C, t["D"], t["z"], t["dt_bias"], True)
                du, ddelta, dA, dB, dC, dD, dbias, dz = ssc.bwd(
                    t["x"], t["dt"], t["A"], B, C, t["D"], t["z"], t["dt_bias"], t["dy"], xs, out, None,
                    True, False)[:8]
            return rest[0], (du, ddelta, dA, dB[:, 0], dC[:, 0], dD, dz, dbias)
        return "selective_scan_cuda (mamba_ssm 2.3.2 CUDA)", fwd, fwd_bwd
    except Exception as exc:  # noqa: BLE001
        print(f"peer: selective_scan_cuda not importable ({type(exc).__name__}: {str(exc)[:200]})")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as ssr

        def f(t):
            return ssr(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], delta_softplus=True)
        return "mamba_ssm selective_scan_ref (torch loop)", *_autograd_pair(f)
    except Exception as exc:  # noqa: BLE001
        print(f"peer: mamba_ssm selective_scan_ref not importable ({type(exc).__name__}: {str(exc)[:200]})")
    return None


def _autograd_pair(f):
    import torch

    def fwd(t):
        with torch.no_grad():
            return f(t)

    def fwd_bwd(t):
        y = f(t)
        names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
        return y, torch.autograd.grad(y, [t[k] for k in names], t["dy"])
    return fwd, fwd_bwd


def torch_inputs(inp, dev="cuda"):
    """mamba_ssm layouts on the GPU: bf16 u, delta, z, B, C transposed to [b, *, L]; f32 A, D, delta_bias."""
    import torch
    bf = torch.bfloat16
    tr = lambda a: torch.tensor(np.ascontiguousarray(a.transpose(0, 2, 1)), device=dev).to(bf)  # noqa: E731
    t = {k: tr(inp[k]) for k in ("x", "dt", "z", "B", "C", "dy")}
    t.update({k: torch.tensor(inp[k], device=dev) for k in ("A", "D", "dt_bias")})
    for k, v in t.items():
        if k != "dy":
            v.requires_grad_()
    return t


# ------------------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------------------
# tuning variants checked like the defaults (code paths the defaults do not take: the backward's channel groups keep
# carries in memory between chunks, read back by the thread that wrote them, which only the device shows)
CHECKED_VARIANTS = [{}, {"groups_bwd": 4, "sub_blocks_bwd": 1}]


def correctness_check(interpret=False):
    """f32 kernels on this device vs the jnp definition: output, final state and every gradient (defaults and
    CHECKED_VARIANTS)."""
    print("== correctness (f32, Pallas on this device vs the lax.scan definition) ==")
    worst = 0.0
    cases = [((2, 300, 96, 16), dict(seg=False)), ((1, 530, 200, 64), dict(seg=True)), ((2, 64, 40, 5), {})]
    if interpret:
        cases = [((1, 40, 24, 16), dict(seg=True))]
    for (b, L, E, N), opts, var in [(shape, o, v) for v in CHECKED_VARIANTS for shape, o in cases]:
        rng = np.random.default_rng(b * L + E)
        inp = {k: jnp.asarray(v) for k, v in make_inputs(L, b, L, E, N).items()}
        dy = inp.pop("dy")
        inp["A"] = inp["A"] / N * rng.uniform(0.5, 2.0)
        seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, L)), axis=1), jnp.int32) if opts.get("seg") else None
        h0 = jnp.asarray(rng.standard_normal((b, E, N)), jnp.float32)
        rs = jnp.asarray(rng.standard_normal((b, E, N)), jnp.float32)

        def loss(impl):
            def f(p):
                y, s = impl(p["x"], p["dt"], p["A"], p["B"], p["C"], D=p["D"], z=p["z"], dt_bias=p["dt_bias"],
                            initial_state=p["h0"], segment_ids=seg)
                return jnp.sum(y * dy) + jnp.sum(s * rs), (y, s)
            return jax.jit(jax.grad(f, has_aux=True))

        params = dict(inp, h0=h0)
        def pal(*a, var=var, **k):
            with tuning.override(**var):
                return selective_scan_pallas(*a, interpret=interpret, **k)
        ref = lambda *a, **k: selective_scan_ref(*a, return_final_state=True, **k)  # noqa: E731
        g0, (y0, s0) = loss(ref)(params)
        g1, (y1, s1) = loss(pal)(params)
        errs = {"y": rel(y1, y0), "state": rel(s1, s0)}
        errs.update({"d" + k: rel(g1[k], g0[k]) for k in g0})
        worst = max(worst, max(errs.values()))
        print(f"  b{b} L{L} E{E} N{N} {opts} {var or 'defaults'}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    print(f"  worst rel err {worst:.2e} -> {'PASS' if worst <= 1e-4 else 'FAIL'} (tolerance 1e-4)")
    return worst


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def bench_one(cfg, peer, with_ref, interpret, bw, nvar=None, profile=False):
    name, b, L, E, N, variants, n_timed = cfg
    variants = variants[:n_timed if nvar is None else min(n_timed, nvar)]
    inp = make_inputs(0, b, L, E, N)
    bf = jnp.bfloat16
    jx = {k: jnp.asarray(inp[k], bf) for k in ("x", "dt", "B", "C", "z")}
    jx.update({k: jnp.asarray(inp[k]) for k in ("A", "D", "dt_bias")})
    jdy = jnp.asarray(inp["dy"], bf)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    args = tuple(jx[k] for k in names)
    fl = floors(b, L, E, N)
    res = dict(config=name, b=b, L=L, E=E, N=N, variants={})

    def call(impl, x, dt, A, B, C, D, z, dt_bias):
        return impl(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias)

    # accuracy of the bf16 kernel vs the f32 definition on the same (bf16-rounded) values
    up = tuple(a.astype(jnp.float32) for a in args)
    y_ref = jax.jit(lambda *a: call(selective_scan_ref, *a))(*up)
    best_f = best_fb = float("inf")
    y_w = grads_w = None
    for vi, var in enumerate(variants):
        def f_fwd(*a, var=var):
            with tuning.override(**var):  # read while jax.jit traces this function
                return call(lambda *aa, **kk: selective_scan_pallas(*aa, interpret=interpret, **kk)[0], *a)

        fwd = jax.jit(f_fwd)

        @jax.jit
        def fwd_bwd(*a, f_fwd=f_fwd):
            y, vjp = jax.vjp(f_fwd, *a[:-1])
            return y, vjp(a[-1])

        try:
            t0 = time.perf_counter()
            y_v, grads_v = fwd_bwd(*args, jdy)
            jax.block_until_ready(fwd(*args))
            print(f"  {name} variant {var}: compile + first call {time.perf_counter() - t0:.1f} s", flush=True)
            if vi == 0:
                y_w, grads_w = y_v, grads_v
                res["wmjax_vs_f32ref"] = rel(y_w, y_ref)
            else:
                # bf16 outputs: summation orders differ by bf16 roundings (~1e-3); a wrong lane is O(1)
                res["variants"][str(var)] = dict(y_rel_vs_default=rel(y_v, y_w), grads_rel_vs_default=max(
                    rel(gv, gw) for gv, gw in zip(jax.tree.leaves(grads_v), jax.tree.leaves(grads_w))))
            t_f, _ = time_fn(lambda: fwd(*args), jax_sync)
            t_fb, _ = time_fn(lambda: fwd_bwd(*args, jdy), jax_sync)
        except Exception as exc:  # noqa: BLE001 - keep the other variants' numbers
            print(f"  variant {var} failed: {type(exc).__name__}: {str(exc)[:1500]}")
            if vi == 0:
                raise
            continue
        res["variants"].setdefault(str(var), {}).update(fwd_ms=t_f * 1e3, fwdbwd_ms=t_fb * 1e3)
        v = res["variants"][str(var)]
        vs = f" (vs default: y {v['y_rel_vs_default']:.1e}, grads {v['grads_rel_vs_default']:.1e})" if vi else ""
        print(f"  {name} variant {var}: fwd {t_f * 1e3:.3f} ms, fwd+bwd {t_fb * 1e3:.3f} ms{vs}", flush=True)
        best_f, best_fb = min(best_f, t_f), min(best_fb, t_fb)
        if profile:   # where each variant's forward + backward spends its time, kernel by kernel
            from bench.kernel_profile import kernel_table, print_kernel_table
            print_kernel_table(kernel_table(lambda: fwd_bwd(*args, jdy), iters=3), top=14 if vi == 0 else 8,
                               title=f"{name} fwd+bwd, {var or 'default'}")
        if vi == 0:
            res.update(default_fwd_ms=t_f * 1e3, default_fwdbwd_ms=t_fb * 1e3)

    res.update(wmjax_fwd_ms=best_f * 1e3, wmjax_fwdbwd_ms=best_fb * 1e3)

    if with_ref:
        ref_f = jax.jit(lambda *a: call(selective_scan_ref, *a))

        @jax.jit
        def ref_fb(*a):
            y, vjp = jax.vjp(lambda *aa: call(selective_scan_ref, *aa), *a[:-1])
            return y, vjp(a[-1])
        t_rf, _ = time_fn(lambda: ref_f(*args), jax_sync, n_inner=2, reps=3, warm=1)
        t_rfb, _ = time_fn(lambda: ref_fb(*args, jdy), jax_sync, n_inner=1, reps=3, warm=1)
        res.update(ref_fwd_ms=t_rf * 1e3, ref_fwdbwd_ms=t_rfb * 1e3)
        print(f"  {name} jnp reference: fwd {t_rf * 1e3:.3f} ms, fwd+bwd {t_rfb * 1e3:.3f} ms", flush=True)

    if peer is not None:
        try:
            time_peer(peer, inp, res, y_w, grads_w, y_ref, names)
        except Exception as exc:  # noqa: BLE001 - keep the wmjax numbers
            import traceback
            traceback.print_exc()
            print(f"  peer failed: {type(exc).__name__}: {str(exc)[:1500]}")
    for k, v in fl.items():
        res[f"{k}_bytes"] = v["bytes"]
        res[f"floor_{k}_bytes_us"] = v["bytes"] / bw * 1e6
        res[f"floor_{k}_exp_us"] = v["t_exp"] * 1e6
    print(json.dumps(res), flush=True)
    return res


def time_peer(peer, inp, res, y_w, grads_w, y_ref, names, dev="cuda"):
    """Peer accuracy (vs the wmjax kernel and the f32 definition) and times, into res."""
    import torch
    pname, p_fwd, p_fb = peer
    if True:
        res["peer"] = pname
        t = torch_inputs(inp, dev)
        to_np = lambda v: v.detach().float().cpu().numpy()  # noqa: E731
        y_m, g_m = p_fb(t)
        res["y_rel_vs_peer"] = rel(y_w, to_np(y_m).transpose(0, 2, 1))
        tr = {"x", "dt", "B", "C", "z"}
        for nm, gw, gm in zip(names, grads_w, g_m):
            gm = to_np(gm)
            res[f"d{nm}_rel_vs_peer"] = rel(gw, gm.transpose(0, 2, 1) if nm in tr else gm)
        res["peer_vs_f32ref"] = rel(to_np(y_m).transpose(0, 2, 1), y_ref)
        slow = "loop" in pname
        kw = dict(n_inner=1, reps=3, warm=1) if slow else {}
        tsync = (lambda r: torch.cuda.synchronize()) if dev == "cuda" else (lambda r: None)
        t_mf, _ = time_fn(lambda: p_fwd(t), tsync, **kw)
        t_mfb, _ = time_fn(lambda: p_fb(t), tsync, **kw)
        res.update(peer_fwd_ms=t_mf * 1e3, peer_fwdbwd_ms=t_mfb * 1e3)
        print(f"  {res['config']} {pname}: fwd {t_mf * 1e3:.3f} ms, fwd+bwd {t_mfb * 1e3:.3f} ms", flush=True)
        del t, y_m, g_m
        if dev == "cuda":
            torch.cuda.empty_cache()


def print_table(rows):
    print()
    hdr = (f"| {'config':26s} | pass    | wmjax ms | peer ms  | wmjax/peer | jnp ref ms | wmjax GB/s | "
           f"byte floor us | exp floor us | floor/wmjax |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        for k, key in (("fwd", "fwd"), ("fwd+bwd", "fwdbwd")):
            tw = r[f"wmjax_{key}_ms"]
            tp = r.get(f"peer_{key}_ms", float("nan"))
            tr = r.get(f"ref_{key}_ms", float("nan"))
            fb, fe = r[f"floor_{k}_bytes_us"], r[f"floor_{k}_exp_us"]
            print(f"| {r['config']:26s} | {k:7s} | {tw:8.3f} | {tp:8.3f} | {tw / tp:10.2f} | {tr:10.2f} | "
                  f"{r[f'{k}_bytes'] / tw / 1e6:10.0f} | {fb:13.1f} | {fe:12.1f} | {max(fb, fe) / 1e3 / tw:11.2f} |")
    if rows and "peer" in rows[0]:
        print(f"peer: {rows[0]['peer']}")


def run_bench(configs, peer, with_ref, interpret=False, json_path=None, nvar=None, profile=False):
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}")
    bw = copy_bandwidth() if not interpret else 3.0e12
    print(f"measured copy bandwidth {bw / 1e12:.2f} TB/s; nominal exp rate {EXP_RATE / 1e12:.2f} T/s")
    rows = []
    for cfg in configs:
        try:
            rows.append(bench_one(cfg, peer, with_ref, interpret, bw, nvar, profile))
        except Exception as exc:  # noqa: BLE001 - keep the other shapes' numbers
            import traceback
            traceback.print_exc()
            print(f"FAILED {cfg[0]}: {type(exc).__name__}: {str(exc)[:2000]}")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(dict(device=dev.device_kind, jax=jax.__version__, bw=bw, rows=rows), fh, indent=1)
    print_table(rows)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-check", action="store_true", help="skip the f32 correctness check")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the jnp lax.scan definition")
    ap.add_argument("--only", default=None, help="substring filter on config names")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--nvar", type=int, default=None, help="time at most the first NVAR kernel variants per shape")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel times of each timed variant's forward + backward")
    a = ap.parse_args()
    if a.cpu_smoke:
        if not a.no_check:
            correctness_check(interpret=True)
        # the default and one variant (backward channel groups), so the variant comparison runs too
        run_bench([("smoke", 1, 64, 32, 16, VARIANTS_N16, 2)], peer=None, with_ref=True, interpret=True)
        return
    if not a.no_check:
        worst = correctness_check()
        if worst > 1e-4:
            print("correctness check FAILED; timing anyway")
    peer = None if a.no_peer else find_peer()
    print(f"peer: {peer[0] if peer else 'none'}")
    cfgs = [c for c in CONFIGS if a.only is None or a.only in c[0]]
    run_bench(cfgs, peer, with_ref=not a.no_ref, json_path=a.json, nvar=a.nvar, profile=a.profile)


if __name__ == "__main__":
    main()
