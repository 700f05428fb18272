"""SSD (Mamba-2 state-space duality) scan: references, Pallas kernels (interpret mode), decode step, lowering.

Everything is compared with the naive sequential recurrence (``ssd_naive``, the definition) in float32 by the
relative error ||out - ref|| / ||ref||.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from abstract_gpu import abstract_h100
from pallas_kernels.ssd import ssd_pallas, tuning
from pallas_kernels.ssd.reference import segment_reset_counts, ssd_step
from pallas_kernels.ssd.reference import ssd_chunked as _ssd_chunked
from pallas_kernels.ssd.reference import ssd_naive as _ssd_naive
from wmjax.ops.ssd import ssd


# jit the references once per shape (eager op-by-op dispatch is far slower on CPU)
ssd_naive = jax.jit(_ssd_naive)
ssd_chunked = jax.jit(_ssd_chunked, static_argnames=("chunk_size",))

warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, b, L, h, p, g, n, *, D=False, z=False, h0=False, seg=False, posA=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    out = dict(
        x=jnp.asarray(rng.standard_normal((b, L, h, p)), dtype),
        dt=jnp.asarray(rng.uniform(0.01, 0.5, (b, L, h)), jnp.float32),
        # posA: Cheems' raw A (initialised at +1): a growing state, computed exactly (no clamping)
        A=jnp.asarray((1 if posA else -1) * rng.uniform(0.2, 2.0, (h,)) / (20 if posA else 1), jnp.float32),
        B=jnp.asarray(rng.standard_normal((b, L, g, n)) / np.sqrt(n), dtype),
        C=jnp.asarray(rng.standard_normal((b, L, g, n)), dtype),
    )
    kw = {}
    if D:
        kw["D"] = jnp.asarray(rng.standard_normal((h,)), jnp.float32)
    if z:
        kw["z"] = jnp.asarray(rng.standard_normal((b, L, h, p)), dtype)
    if h0:
        kw["initial_state"] = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    if seg:
        # packed documents: sorted random ids, plus a boundary exactly at the first token of a chunk
        ids = np.sort(rng.integers(0, 5, (b, L)), axis=1)
        ids[0, min(L - 1, 32):] += 10
        kw["segment_ids"] = jnp.asarray(ids, jnp.int32)
    return out, kw


# ------------------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,chunk,opts",
    [
        ((2, 64, 4, 8, 1, 16), 16, {}),
        ((2, 45, 4, 8, 2, 16), 16, dict(D=True, z=True, h0=True)),
        ((1, 37, 6, 4, 3, 8), 8, dict(D=True, h0=True, seg=True)),
        ((2, 70, 4, 8, 4, 8), 32, dict(z=True, seg=True)),
    ],
)
def test_chunked_matches_naive(shape, chunk, opts):
    arrs, kw = _inputs(0, *shape, **opts)
    y0, s0 = ssd_naive(**arrs, **kw)
    y1, s1 = ssd_chunked(**arrs, chunk_size=chunk, **kw)
    chex.assert_equal_shape([y0, y1, arrs["x"]])
    chex.assert_trees_all_equal_dtypes(y1, arrs["x"])
    assert _rel(y1, y0) < 1e-5
    assert _rel(s1, s0) < 1e-5


def test_segments_reset_state():
    """A packed row equals the documents run separately (h0 reaches only the first one)."""
    arrs, kw = _inputs(3, 1, 40, 2, 4, 1, 8, h0=True)
    ids = jnp.asarray(np.r_[np.zeros(15), np.ones(25)][None], jnp.int32)
    y, s = ssd_chunked(**arrs, chunk_size=16, segment_ids=ids, **kw)
    cut = lambda a, lo, hi: a[:, lo:hi]  # noqa: E731
    first = {k: cut(v, 0, 15) if k != "A" else v for k, v in arrs.items()}
    second = {k: cut(v, 15, 40) if k != "A" else v for k, v in arrs.items()}
    ya, _ = ssd_naive(**first, **kw)
    yb, sb = ssd_naive(**second)
    assert _rel(y, jnp.concatenate([ya, yb], axis=1)) < 1e-5
    assert _rel(s, sb) < 1e-5
    np.testing.assert_array_equal(segment_reset_counts(jnp.asarray([[3, 3, 1, 1, 3]])), [[0, 0, 1, 1, 2]])


def test_step_reproduces_scan():
    b, L, h, p, g, n = 2, 12, 4, 8, 2, 16
    arrs, kw = _inputs(1, b, L, h, p, g, n, D=True, z=True, h0=True)
    y_ref, s_ref = ssd_naive(**arrs, **kw)
    y_chk, _ = ssd_chunked(**arrs, chunk_size=8, **kw)
    state = kw["initial_state"]
    ys = []
    for t in range(L):
        y_t, state = ssd_step(state, arrs["x"][:, t], arrs["dt"][:, t], arrs["A"], arrs["B"][:, t],
                              arrs["C"][:, t], D=kw["D"], z_t=kw["z"][:, t])
        ys.append(y_t)
    y = jnp.stack(ys, axis=1)
    assert _rel(y, y_ref) < 1e-5 and _rel(y, y_chk) < 1e-5
    assert _rel(state, s_ref) < 1e-5


def test_dispatcher():
    arrs, kw = _inputs(2, 1, 20, 2, 16, 1, 16, D=True)
    y_n, s_n = ssd(**arrs, **kw, implementation="naive", return_final_state=True)
    y_d = ssd(**arrs, **kw, chunk_size=16)  # CPU -> chunked
    y_p, s_p = ssd(**arrs, **kw, chunk_size=16, implementation="pallas", return_final_state=True)
    assert _rel(y_d, y_n) < 1e-5 and _rel(y_p, y_n) < 1e-5 and _rel(s_p, s_n) < 1e-5
    with pytest.raises(ValueError):
        ssd(**arrs, implementation="bogus")


# ------------------------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode: forward, final state and every gradient vs the naive recurrence
# ------------------------------------------------------------------------------------------------------------
def _pallas(chunk, **tune):
    """ssd_pallas in interpret mode with `tune` (pallas_kernels.ssd.tuning fields) applied while it traces."""
    def f(*a, **k):
        with tuning.override(**tune):
            return ssd_pallas(*a, chunk_size=chunk, interpret=True, **k)
    return f


def _loss(impl, kw_static, seed=0):
    def f(x, dt, A, B, C, kw):
        y, s = impl(x, dt, A, B, C, **kw, **kw_static)
        ry = jnp.asarray(np.random.default_rng(seed).standard_normal(y.shape), jnp.float32)
        rs = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(s.shape), jnp.float32)
        return jnp.sum(y.astype(jnp.float32) * ry) + jnp.sum(s * rs)
    return f


PALLAS_CASES = [
    # (b, L, h, p, g, n), chunk, block_t, options
    pytest.param((2, 45, 4, 16, 1, 16), 32, 16, {}, id="g1-ragged"),
    pytest.param((1, 70, 4, 16, 2, 32), 32, 16, dict(D=True, z=True, h0=True), id="g2-Dz-h0-ragged"),
    pytest.param((2, 64, 4, 16, 4, 16), 32, 16, dict(D=True, h0=True, seg=True), id="g=h-h0-packed"),
    pytest.param((1, 40, 2, 12, 1, 20), 16, 16, dict(h0=True, seg=True), id="nonpow2-pn-packed"),
    pytest.param((1, 48, 2, 16, 2, 16), 16, 16, dict(posA=True, h0=True), id="positive-A"),
]


def test_pallas_interpret_one_head_per_backward_program():
    """Tuning through the override hook: one head per backward program (dB / dC summed by XLA, not in registers)."""
    arrs, kw = _inputs(11, 1, 40, 4, 16, 2, 16, h0=True, seg=True)
    seg = kw.pop("segment_ids")
    pallas = _pallas(16, bwd_heads=1)
    args = (arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], kw)
    g0 = jax.jit(jax.grad(_loss(_ssd_naive, dict(segment_ids=seg)), argnums=(0, 1, 2, 3, 4, 5)))(*args)
    g1 = jax.jit(jax.grad(_loss(pallas, dict(segment_ids=seg)), argnums=(0, 1, 2, 3, 4, 5)))(*args)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) <= 1e-4


@pytest.mark.parametrize("shape,chunk,block_t,opts", PALLAS_CASES)
def test_pallas_interpret_fwd_bwd(shape, chunk, block_t, opts):
    arrs, kw = _inputs(sum(shape), *shape, **opts)
    seg = kw.pop("segment_ids", None)
    pallas = _pallas(chunk, block_t=block_t)
    y0, s0 = ssd_naive(**arrs, segment_ids=seg, **kw)
    y1, s1 = jax.jit(pallas)(**arrs, segment_ids=seg, **kw)
    chex.assert_equal_shape([y0, y1])
    chex.assert_trees_all_equal_dtypes(y1, arrs["x"])
    assert np.isfinite(np.asarray(y1)).all()
    assert _rel(y1, y0) <= 1e-4 and _rel(s1, s0) <= 1e-4

    args = (arrs["x"], arrs["dt"], arrs["A"], arrs["B"], arrs["C"], kw)
    g0 = jax.jit(jax.grad(_loss(_ssd_naive, dict(segment_ids=seg)), argnums=(0, 1, 2, 3, 4, 5)))(*args)
    g1 = jax.jit(jax.grad(_loss(pallas, dict(segment_ids=seg)), argnums=(0, 1, 2, 3, 4, 5)))(*args)
    names = ["dx", "ddt", "dA", "dB", "dC"] + [f"d{k}" for k in kw]
    flat0 = list(g0[:5]) + [g0[5][k] for k in kw]
    flat1 = list(g1[:5]) + [g1[5][k] for k in kw]
    for name, a, b in zip(names, flat1, flat0):
        chex.assert_equal_shape([a, b])
        assert np.isfinite(np.asarray(a)).all(), name
        assert _rel(a, b) <= 1e-4, (name, _rel(a, b))


def test_pallas_interpret_bf16_close():
    """bf16 inputs (bf16 matmul operands, f32 accumulation) stay within bf16 rounding of the f32 definition."""
    arrs, kw = _inputs(7, 1, 64, 2, 32, 1, 32, D=True)
    y0, _ = ssd_naive(**arrs, **kw)
    a16 = {k: (v.astype(jnp.bfloat16) if k in ("x", "B", "C") else v) for k, v in arrs.items()}
    y1, _ = jax.jit(_pallas(32, block_t=16))(**a16, **kw)
    assert y1.dtype == jnp.bfloat16
    assert _rel(y1, y0) < 2e-2


# ------------------------------------------------------------------------------------------------------------
# The GPU path lowers for an abstract H100 (catches Triton lowering errors that interpret mode hides)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dtype,opts",
    [
        ((2, 512, 24, 64, 1, 128), jnp.bfloat16, {}),                       # benchmark shape family
        ((1, 300, 8, 128, 8, 128), jnp.bfloat16, dict(D=True, z=True, seg=True, h0=True)),  # Cheems g = h
        ((1, 256, 4, 32, 2, 16), jnp.float32, dict(seg=True)),
        ((1, 512, 8, 64, 2, 128), jnp.bfloat16, dict(tuning={"block_t": 128})),
        ((1, 512, 8, 64, 1, 128), jnp.bfloat16, dict(tuning={"block_t": 32, "bwd_heads": 1})),
    ],
)
def test_lowers_for_abstract_h100(shape, dtype, opts):
    opts = dict(opts)
    tune = opts.pop("tuning", {})
    arrs, kw = _inputs(0, *shape, dtype=dtype, **opts)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    arrs = {k: spec(v) for k, v in arrs.items()}
    kw = {k: spec(v) for k, v in kw.items()}
    names = list(arrs)

    def fwd(*a, **k):
        return ssd_pallas(*a, chunk_size=256, **k)

    def fwd_bwd(*a, **k):
        def loss(*aa):
            y, s = ssd_pallas(*aa, chunk_size=256, **k)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=tuple(range(5)))(*a)

    with abstract_h100(), tuning.override(**tune):
        # fwd: chunk_states, state_passing, chunk_scan; fwd+bwd: chunk_states, state_passing (fwd and bwd),
        # chunk_scan_bwd, chunk_states_bwd (the forward chunk_scan is dead code under grad)
        for f, n_min in ((fwd, 3), (fwd_bwd, 5)):
            lowered = jax.jit(f).trace(*[arrs[k] for k in names], **kw).lower(lowering_platforms=("cuda",))
            txt = lowered.as_text()
            assert txt.count("__gpu$xla.gpu.triton") == n_min, f.__name__
