"""Mamba-1 selective scan (OTCE): the lax.scan definition vs a python loop, the decode step, the in-register scan
primitive, the Pallas kernels (interpret mode: output, final state and every gradient; L not a multiple of the
chunk, document resets inside chunks and at chunk boundaries, N = 16 and 64), the dispatcher (also per batch shard
under a mesh) and the lowering for an abstract H100 (and its time).

Errors are relative: ||out - ref|| / ||ref||, in float64.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
import time
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstract_gpu import abstract_h100
from pallas_kernels.selective_scan import selective_scan_pallas, selective_scan_ref, selective_scan_step, tuning
from pallas_kernels.selective_scan import linear_scan as ls_module
from pallas_kernels.selective_scan.linear_scan import linear_scan
from pallas_kernels.selective_scan.reference import softplus
from wmjax.ops.selective_scan import selective_scan


warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

OPTS = ("D", "z", "dt_bias", "initial_state")


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, b, L, E, N, *, opts=(), seg=False, dtype=jnp.float32, dt_positive=False):
    rng = np.random.default_rng(seed)
    arrs = dict(
        x=jnp.asarray(rng.standard_normal((b, L, E)), dtype),
        dt=jnp.asarray(rng.uniform(0.01, 0.5, (b, L, E)) if dt_positive else rng.standard_normal((b, L, E)) - 1.0,
                       dtype),
        A=jnp.asarray(-np.exp(rng.uniform(-1.0, 1.5, (E, N))), jnp.float32),
        B=jnp.asarray(rng.standard_normal((b, L, N)) / np.sqrt(N), dtype),
        C=jnp.asarray(rng.standard_normal((b, L, N)), dtype),
    )
    kw = {}
    if "D" in opts:
        kw["D"] = jnp.asarray(rng.standard_normal((E,)), jnp.float32)
    if "z" in opts:
        kw["z"] = jnp.asarray(rng.standard_normal((b, L, E)), dtype)
    if "dt_bias" in opts:
        kw["dt_bias"] = jnp.asarray(rng.standard_normal((E,)) * 0.5, jnp.float32)
    if "initial_state" in opts:
        kw["initial_state"] = jnp.asarray(rng.standard_normal((b, E, N)), jnp.float32)
    seg_ids = None
    if isinstance(seg, tuple):   # document starts at these positions (every row)
        ids = np.zeros((b, L), np.int64)
        for p in seg:
            ids[:, p:] += 1
        seg_ids = jnp.asarray(ids, jnp.int32)
    elif seg:
        ids = np.sort(rng.integers(0, 4, (b, L)), axis=1)
        ids[0, L // 2:] += 10   # at least one boundary
        seg_ids = jnp.asarray(ids, jnp.int32)
    return arrs, kw, seg_ids


def _naive(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, segment_ids=None, initial_state=None):
    """Python loops over b, t, e, n in float64 (numpy): the recurrence written out."""
    x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
    b, L, E = x.shape
    N = A.shape[1]
    y = np.zeros((b, L, E))
    hs = np.zeros((b, E, N))
    for i in range(b):
        h = np.zeros((E, N)) if initial_state is None else np.asarray(initial_state[i], np.float64).copy()
        for t in range(L):
            if segment_ids is not None and t > 0 and segment_ids[i, t] != segment_ids[i, t - 1]:
                h[:] = 0.0
            for e in range(E):
                v = dt[i, t, e] + (0.0 if dt_bias is None else float(dt_bias[e]))
                d = (v if v > 20 else np.log1p(np.exp(v))) if dt_softplus else v
                for n in range(N):
                    h[e, n] = np.exp(d * A[e, n]) * h[e, n] + d * B[i, t, n] * x[i, t, e]
                out = sum(h[e, n] * C[i, t, n] for n in range(N))
                if D is not None:
                    out += float(D[e]) * x[i, t, e]
                if z is not None:
                    zz = float(z[i, t, e])
                    out *= zz / (1.0 + np.exp(-zz))
                y[i, t, e] = out
        hs[i] = h
    return y, hs


_ref = jax.jit(selective_scan_ref, static_argnames=("dt_softplus", "return_final_state"))


# ------------------------------------------------------------------------------------------------------------
# The definition
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softplus_on", [True, False])
def test_reference_matches_python_loop(softplus_on):
    arrs, kw, seg = _inputs(0, 2, 7, 3, 2, opts=OPTS, seg=True, dt_positive=not softplus_on)
    y0, s0 = _naive(**arrs, **kw, dt_softplus=softplus_on, segment_ids=np.asarray(seg))
    y1, s1 = _ref(**arrs, **kw, dt_softplus=softplus_on, segment_ids=seg, return_final_state=True)
    chex.assert_shape(y1, arrs["x"].shape)
    chex.assert_shape(s1, kw["initial_state"].shape)
    assert _rel(y1, y0) < 1e-5 and _rel(s1, s0) < 1e-5


def test_softplus_threshold():
    v = jnp.asarray([-30.0, -1.0, 0.0, 3.0, 19.9, 20.1, 50.0])
    np.testing.assert_allclose(softplus(v), jax.nn.softplus(v), rtol=1e-6, atol=1e-12)


def test_segments_behave_as_separate_documents():
    arrs, kw, _ = _inputs(1, 1, 12, 4, 3, opts=("D", "initial_state"))
    seg = jnp.asarray([[0] * 5 + [1] * 7], jnp.int32)
    y, s = _ref(**arrs, **kw, segment_ids=seg, return_final_state=True)
    part = lambda lo, hi: {k: (v if k == "A" else v[:, lo:hi]) for k, v in arrs.items()}  # noqa: E731
    ya = _ref(**part(0, 5), **kw)
    yb, sb = _ref(**part(5, 12), D=kw["D"], return_final_state=True)
    assert _rel(y, jnp.concatenate([ya, yb], axis=1)) < 1e-6 and _rel(s, sb) < 1e-6


def test_step_reproduces_scan():
    b, L, E, N = 2, 9, 5, 4
    arrs, kw, _ = _inputs(2, b, L, E, N, opts=OPTS)
    y_ref, s_ref = _ref(**arrs, **kw, return_final_state=True)
    step = jax.jit(selective_scan_step)
    state, ys = kw["initial_state"], []
    for t in range(L):
        y_t, state = step(state, arrs["x"][:, t], arrs["dt"][:, t], arrs["A"], arrs["B"][:, t], arrs["C"][:, t],
                          D=kw["D"], z=kw["z"][:, t], dt_bias=kw["dt_bias"])
        ys.append(y_t)
    assert _rel(jnp.stack(ys, axis=1), y_ref) < 1e-6 and _rel(state, s_ref) < 1e-6


def test_dispatcher():
    arrs, kw, seg = _inputs(3, 1, 10, 8, 4, opts=("D",), seg=True)
    y_r, s_r = selective_scan(**arrs, **kw, segment_ids=seg, return_final_state=True)  # CPU -> reference
    with tuning.override(chunk=2):
        y_p, s_p = selective_scan(**arrs, **kw, segment_ids=seg, return_final_state=True, impl="pallas")
    y_only = selective_scan(**arrs, **kw, segment_ids=seg, impl="reference")
    assert _rel(y_p, y_r) < 1e-5 and _rel(s_p, s_r) < 1e-5 and _rel(y_only, y_r) == 0.0
    with pytest.raises(ValueError):
        selective_scan(**arrs, impl="bogus")
    with pytest.raises(ValueError):
        selective_scan(arrs["x"], arrs["dt"], arrs["A"][:, :3], arrs["B"], arrs["C"])


def test_tuning_errors_name_the_field():
    """Tunings the kernels cannot run fail before tracing, naming the field."""
    arrs, _, _ = _inputs(4, 1, 16, 64, 4)
    for tune, field in [(dict(groups_bwd=2, num_warps_bwd=2, block_e_bwd=4), "num_warps_bwd"),
                        (dict(groups_bwd=3), "groups_bwd must be a power of two"), (dict(chunk=6), "chunk"),
                        (dict(chunk=4, chunk_bwd=8), "chunk_bwd"), (dict(chunk_bwd=3), "chunk_bwd")]:
        with tuning.override(**tune), pytest.raises(ValueError, match=field):
            selective_scan_pallas(**arrs, interpret=True)


# ------------------------------------------------------------------------------------------------------------
# The in-register scan primitive (its jnp lowering; the Triton one is checked by the H100 lowering test)
# ------------------------------------------------------------------------------------------------------------
def test_linear_scan_kinds():
    rng = np.random.default_rng(11)
    a = rng.uniform(0.0, 1.0, (16, 4, 8)).astype(np.float32)
    a[5] = 0.0                                                   # a reset
    b, g = (rng.standard_normal(a.shape).astype(np.float32) for _ in range(2))
    P, H = jax.jit(lambda a, b: linear_scan(a, b))(a, b)
    _, M, K = jax.jit(lambda a, g: linear_scan(a, jnp.ones_like(a), g, kind="adjoint", reverse=True))(a, g)
    h, G = np.zeros(a.shape[1:]), np.zeros(a.shape[1:])
    for t in range(16):
        h = a[t] * h + b[t]
        np.testing.assert_allclose(H[t], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(P[t], np.prod(a[:t + 1], axis=0), rtol=1e-5, atol=1e-7)
    for t in reversed(range(16)):
        G = g[t] + (a[t + 1] * G if t < 15 else 0.0)
        np.testing.assert_allclose(K[t], G, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(M[t], np.prod(a[t + 1:], axis=0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        linear_scan(a, g, kind="adjoint")


def test_reverse_scan_as_flips():
    """The Triton lowering of a reverse scan is flip, forward scan, flip (the flips masked sums that fold to
    register renames): the same values as the reverse scan, bit for bit, on every axis."""
    rng = np.random.default_rng(12)
    a = rng.uniform(0.0, 1.0, (8, 3, 4)).astype(np.float32)
    g = rng.standard_normal(a.shape).astype(np.float32)
    for axis in range(3):
        np.testing.assert_array_equal(ls_module._flip(jnp.asarray(a), axis), np.flip(a, axis))
        want = ls_module._impl(a, np.ones_like(a), g, kind="adjoint", axis=axis, reverse=True)
        got = jax.jit(lambda a, g, axis=axis: ls_module._flipped(a, jnp.ones_like(a), g, kind="adjoint",
                                                                 axis=axis))(a, g)
        for w, o in zip(want, got):
            np.testing.assert_array_equal(np.asarray(o), np.asarray(w))


# ------------------------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode: output, final state and every gradient vs the definition
# ------------------------------------------------------------------------------------------------------------
def _loss(impl, static, seed=0):
    def f(x, dt, A, B, C, kw):
        y, s = impl(x, dt, A, B, C, **kw, **static)
        ry = jnp.asarray(np.random.default_rng(seed).standard_normal(y.shape), jnp.float32)
        rs = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(s.shape), jnp.float32)
        return jnp.sum(y.astype(jnp.float32) * ry) + jnp.sum(s * rs), (y, s)
    return f


def _pallas(**tune):
    def f(*a, **k):
        with tuning.override(**tune):
            return selective_scan_pallas(*a, interpret=True, **k)
    return f


def _ref_state(*a, **k):
    return selective_scan_ref(*a, return_final_state=True, **k)


KERNEL_CASES = [
    # (b, L, E, N), tuning, options, segments (True: random; a tuple: document starts), dt_softplus
    pytest.param((2, 21, 20, 5), dict(chunk=8, block_e_fwd=16, block_e_bwd=8), (), False, True, id="bare-ragged"),
    pytest.param((2, 19, 16, 8), dict(chunk=4, block_e_fwd=8, block_e_bwd=16, sub_blocks_bwd=1), OPTS,
                 (4, 6, 7, 13), True, id="D-z-bias-h0-resets-at-and-inside-chunks-S1"),
    pytest.param((1, 15, 8, 16), dict(chunk=8, block_e_fwd=8, block_e_bwd=2, sub_blocks_bwd=4, prefetch_fwd=False,
                                      prefetch_bwd=True), ("z", "initial_state"), True, False,
                 id="N16-no-softplus-packed-S4-prefetch-swapped"),
    pytest.param((1, 40, 8, 64), {}, ("D", "dt_bias", "initial_state"), (8, 16, 29), True, id="N64-defaults-packed"),
    # the backward's sums as Triton's butterflies where the reduce-scatter would apply (tuning scatter_bwd)
    pytest.param((2, 21, 20, 5), dict(chunk=8, block_e_bwd=8, scatter_bwd=False), OPTS, True, True,
                 id="butterfly-sums"),
    # sequence parallelism: parts of whole chunks (a huge part_programs asks for as many as the length allows)
    pytest.param((2, 37, 16, 16), dict(chunk=2, part_programs_fwd=10**6, part_programs_bwd=10**6, lanes_n_fwd=8,
                                       lanes_n_bwd=8, block_e_fwd=8, block_e_bwd=4, sub_blocks_bwd=1),
                 OPTS, (8, 9, 17, 30), True, id="parts4-ragged-resets-at-part-boundaries-h0"),
    pytest.param((1, 64, 16, 8), dict(chunk=4, part_programs_fwd=10**6, part_programs_bwd=10**6, lanes_n_fwd=2,
                                      lanes_n_bwd=2, block_e_fwd=16, block_e_bwd=4,
                                      sub_blocks_bwd=2, prefetch_fwd=False, prefetch_bwd=True),
                 ("z", "initial_state"), True, False, id="parts4-S2-no-softplus-packed"),
    # 16 parts: the part folds run as a loop over unrolled groups of 8 (kernels._carry_in)
    pytest.param((1, 260, 8, 16), dict(chunk=2, part_programs_fwd=10**6, part_programs_bwd=10**6),
                 ("z", "initial_state"), True, True, id="parts16-grouped-folds"),
    pytest.param((1, 70, 8, 16), dict(chunk=2, part_programs_fwd=2, part_programs_bwd=10**6, num_warps_fwd=4), OPTS,
                 True, True,
                 id="parts-bwd-only-padded-to-whole-parts"),
    # backward channel groups (a dynamic loop per chunk, carries in memory): with sub-blocks, parts and resets at
    # part boundaries; at N = 64 with E = 20 padded to the program's 4 x 2 x 2 channels; with Triton's sums
    pytest.param((2, 37, 16, 16), dict(chunk=2, part_programs_fwd=10**6, part_programs_bwd=10**6, lanes_n_fwd=8,
                                       lanes_n_bwd=8, block_e_fwd=8, block_e_bwd=2, sub_blocks_bwd=2, groups_bwd=2),
                 OPTS, (8, 9, 17, 30), True, id="groups2-S2-parts4-resets-at-part-boundaries"),
    pytest.param((1, 40, 20, 64), dict(groups_bwd=4), ("D", "dt_bias", "initial_state"), (8, 16, 29), True,
                 id="N64-groups4-padded-E"),
    pytest.param((2, 21, 20, 5), dict(chunk=8, block_e_bwd=2, groups_bwd=4, scatter_bwd=False), OPTS, True, True,
                 id="groups4-butterfly-sums"),
    pytest.param((1, 90, 32, 16), dict(block_e_bwd=4, sub_blocks_bwd=1, groups_bwd=4), OPTS, True, True,
                 id="N16-one-channel-a-thread-groups4-parts2"),
    # the backward's chunk shorter than the forward's: the forward saves the states entering every backward chunk
    # from rows inside its own; parts both ways (their boundaries at different chunk counts), resets at and inside
    # the chunks of either
    pytest.param((2, 37, 16, 16), dict(chunk=8, chunk_bwd=2, part_programs_fwd=10**6, part_programs_bwd=10**6),
                 OPTS, (3, 4, 9, 17, 30), True, id="chunk8-bwd2-parts-resets"),
    pytest.param((1, 40, 20, 64), dict(chunk=8, chunk_bwd=4, block_e_bwd=4), ("D", "dt_bias", "initial_state"),
                 (8, 16, 29), True, id="N64-chunk8-bwd4-two-channels-a-thread"),
]
@pytest.mark.parametrize("shape,tune,opts,seg,sp", KERNEL_CASES)
def test_pallas_interpret_fwd_bwd(shape, tune, opts, seg, sp):
    """Output, final state and the gradients of every float argument (one jitted value-and-grad per side)."""
    arrs, kw, seg_ids = _inputs(sum(shape), *shape, opts=opts, seg=seg, dt_positive=not sp)
    static = dict(segment_ids=seg_ids, dt_softplus=sp)
    args = (arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], kw)
    grad = lambda impl: jax.jit(jax.grad(_loss(impl, static), argnums=tuple(range(6)), has_aux=True))  # noqa: E731
    g0, (y0, s0) = grad(_ref_state)(*args)
    g1, (y1, s1) = grad(_pallas(**tune))(*args)
    chex.assert_equal_shape([y0, y1])
    chex.assert_equal_shape([s0, s1])
    chex.assert_trees_all_equal_dtypes(y1, arrs["x"])
    assert np.isfinite(np.asarray(y1)).all()
    assert _rel(y1, y0) < 1e-5 and _rel(s1, s0) < 1e-5, (_rel(y1, y0), _rel(s1, s0))
    names = ["dx", "ddt", "dA", "dB", "dC"] + [f"d{k}" for k in kw]
    flat0 = list(g0[:5]) + [g0[5][k] for k in kw]
    flat1 = list(g1[:5]) + [g1[5][k] for k in kw]
    for name, a, b in zip(names, flat1, flat0):
        chex.assert_equal_shape([a, b])
        assert np.isfinite(np.asarray(a)).all(), name
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("shape,tune", [
    pytest.param((1, 13, 8, 4), dict(chunk=4), id="N4"),
    # the forward's own state split (N2 4 against the backward's 8 at N = 16; 4 against 16 at N = 64), with 4
    # parts (the backward 2) and E = 24 padded to the forward's channel block of 16
    pytest.param((2, 45, 24, 16), dict(chunk=2, part_programs_fwd=64, part_programs_bwd=8), id="N16-own-split-parts"),
    pytest.param((1, 21, 16, 64), dict(chunk=4, lanes_n_fwd=4), id="N64-own-split"),
])
def test_pallas_interpret_forward_only(shape, tune):
    """The primal path (no VJP: the forward kernel without saved states) under jit equals the definition and the
    forward of the differentiated path (the same kernel saving channel-major states for the backward's split)."""
    arrs, kw, seg = _inputs(5, *shape, opts=("D", "z", "initial_state"), seg=True)
    y0, s0 = _ref_state(**arrs, **kw, segment_ids=seg)
    y1, s1 = jax.jit(lambda a, k: _pallas(**tune)(**a, **k, segment_ids=seg))(arrs, kw)
    assert _rel(y1, y0) < 1e-5 and _rel(s1, s0) < 1e-5, (_rel(y1, y0), _rel(s1, s0))

    def differentiated(a, k):   # the forward of the VJP, saving states
        out, _ = jax.vjp(lambda x: _pallas(**tune)(x, a["dt"], a["A"], a["B"], a["C"], **k, segment_ids=seg), a["x"])
        return out

    y2, s2 = jax.jit(differentiated)(arrs, kw)
    assert _rel(y1, y2) < 1e-5 and _rel(s1, s2) < 1e-5, (_rel(y1, y2), _rel(s1, s2))


def test_pallas_interpret_bf16_close():
    """bf16 inputs (f32 arithmetic inside, outputs and input gradients rounded to bf16 once) stay within bf16
    rounding of the f32 definition on the same values."""
    arrs, kw, seg = _inputs(7, 1, 24, 16, 16, opts=("D", "z", "dt_bias"), seg=True, dtype=jnp.bfloat16)
    up = {k: v.astype(jnp.float32) for k, v in arrs.items()}
    kwup = {k: v.astype(jnp.float32) for k, v in kw.items()}
    static = dict(segment_ids=seg)
    grad = lambda impl: jax.jit(jax.grad(_loss(impl, static), argnums=tuple(range(6)), has_aux=True))  # noqa: E731
    g0, (y0, _) = grad(_ref_state)(up["x"], up["dt"], up["A"], up["B"], up["C"], kwup)
    g1, (y1, _) = grad(_pallas(chunk=2))(arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], kw)
    assert y1.dtype == jnp.bfloat16 and g1[0].dtype == jnp.bfloat16 and g1[2].dtype == jnp.float32
    assert _rel(y1, y0) < 1e-2
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 1e-2


# ------------------------------------------------------------------------------------------------------------
# Under a mesh the dispatcher runs the kernels per batch shard (4 fake CPU devices, interpret mode, subprocess)
# ------------------------------------------------------------------------------------------------------------
SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from pallas_kernels.selective_scan import tuning
    from wmjax.ops.selective_scan import selective_scan
    rng = np.random.default_rng(0)
    b, L, E, N = 4, 9, 8, 4
    a = dict(x=rng.standard_normal((b, L, E)), dt=rng.standard_normal((b, L, E)), A=-rng.uniform(0.5, 2, (E, N)),
             B=rng.standard_normal((b, L, N)), C=rng.standard_normal((b, L, N)), D=rng.standard_normal(E),
             z=rng.standard_normal((b, L, E)), dt_bias=rng.standard_normal(E),
             initial_state=rng.standard_normal((b, E, N)))
    a = {k: jnp.asarray(v, jnp.float32) for k, v in a.items()}
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, L)), axis=1), jnp.int32)
    def loss(p, impl):
        y, s = selective_scan(**p, segment_ids=seg, impl=impl, return_final_state=True)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(s ** 2), (y, s)
    g0, (y0, s0) = jax.grad(loss, has_aux=True)(a, "reference")
    rules = (("activation_batch", ("data", "fsdp")),)
    for kind in ("auto", "explicit"):
        if kind == "explicit":
            mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        else:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "fsdp"))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), tuning.override(chunk=2):
            f = jax.jit(jax.grad(lambda p: loss(p, "pallas"), has_aux=True))
            assert "manual" in f.lower(a).as_text().lower(), "the kernel was not wrapped in shard_map"
            g1, (y1, s1) = f(a)
        rel = lambda u, v: float(np.linalg.norm(np.asarray(u) - np.asarray(v)) / np.linalg.norm(np.asarray(v)))
        print(kind, "ok", max([rel(y1, y0), rel(s1, s0)] + [rel(g1[k], g0[k]) for k in g0]), flush=True)
""")


@pytest.mark.slow
def test_dispatcher_runs_per_batch_shard():
    """Output, final state and every gradient (A, D, dt_bias replicated: summed over shards) equal the reference."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln.split() for ln in proc.stdout.splitlines() if " ok " in ln]
    assert [ln[0] for ln in lines] == ["auto", "explicit"], proc.stdout
    assert all(float(ln[2]) < 1e-5 for ln in lines), proc.stdout


# ------------------------------------------------------------------------------------------------------------
# The GPU path lowers for an abstract H100 (catches Triton lowering errors that interpret mode hides)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dtype,opts,seg,tune,kernels",
    [
        # kernels: (forward, forward + backward) pallas_calls; a part pass (sequence parallelism) adds one each
        ((2, 512, 2048, 16), jnp.bfloat16, (), False, {}, (2, 4)),           # benchmark shape family, defaults
        ((1, 300, 768, 64), jnp.bfloat16, OPTS, True, {}, (1, 3)),           # OTCE default N = 64: parts bwd only
        ((1, 300, 768, 64), jnp.bfloat16, OPTS, True, dict(groups_bwd=4), (1, 3)),   # backward channel groups
        ((1, 300, 768, 64), jnp.bfloat16, OPTS, True, dict(chunk_bwd=4, block_e_bwd=4), (1, 3)),  # T 8 fwd, 4 bwd
        ((1, 100, 40, 16), jnp.float32, ("z", "dt_bias"), True,              # E not a multiple of the block,
         dict(chunk=64, prefetch_fwd=False, prefetch_bwd=True, block_e_fwd=2, block_e_bwd=4, sub_blocks_bwd=4),
         (1, 2)),                                                             # 2 chunks: no parts
        ((1, 64, 32, 16), jnp.bfloat16, ("D", "z", "f32 delta"), True,       # OTCE's mixer: bf16 x, f32 delta
         dict(chunk=4), (2, 4)),                                              # (softplus applied outside)
    ],
)
def test_lowers_for_abstract_h100(shape, dtype, opts, seg, tune, kernels):
    b, L, E, N = shape
    S = jax.ShapeDtypeStruct
    f32_delta = "f32 delta" in opts
    arrs = dict(x=S((b, L, E), dtype), dt=S((b, L, E), jnp.float32 if f32_delta else dtype),
                A=S((E, N), jnp.float32), B=S((b, L, N), dtype), C=S((b, L, N), dtype))
    full = dict(D=S((E,), jnp.float32), z=S((b, L, E), dtype), dt_bias=S((E,), jnp.float32),
                initial_state=S((b, E, N), jnp.float32))
    kw = {k: full[k] for k in opts if k in full}
    sp = dict(dt_softplus=False) if f32_delta else {}
    if seg:
        kw["segment_ids"] = S((b, L), jnp.int32)
    names = list(arrs)

    def fwd(*a, **k):
        return selective_scan_pallas(*a, **k, **sp)

    def fwd_bwd(*a, **k):
        seg_ids = k.pop("segment_ids", None)

        def loss(aa, kk):
            y, s = selective_scan_pallas(*aa, segment_ids=seg_ids, **kk, **sp)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1))(a, k)

    with abstract_h100(), tuning.override(**tune):
        # fwd+bwd: the saving forward and the backward (the plain forward is dead under grad)
        for f, n_kernels in zip((fwd, fwd_bwd), kernels):
            t0 = time.perf_counter()
            lowered = jax.jit(f).trace(*[arrs[k] for k in names], **kw).lower(lowering_platforms=("cuda",))
            seconds = time.perf_counter() - t0
            assert lowered.as_text().count("__gpu$xla.gpu.triton") == n_kernels, f.__name__
            # the kernels are one chunk loop each (no unrolled tokens): lowering takes well under a second
            assert seconds < 10.0, (f.__name__, seconds)
