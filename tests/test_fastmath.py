"""pallas_kernels.fastmath: the composite formulas (softplus's log1p trick, sigmoid) against float64, the primitives'
non-Triton lowerings, and the Triton lowering of every op for an abstract H100 (interpret mode would hide a bad
rule). The MUFU approximations themselves run only on a GPU: bench/selective_scan.py's f32 check covers them."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from abstract_gpu import abstract_h100
from pallas_kernels import fastmath


warnings.filterwarnings("ignore", message="The Pallas Triton backend is deprecated")

X = np.concatenate([np.linspace(-30.0, 30.0, 2001), -np.logspace(-8, 1.5, 200), np.logspace(-8, 1.5, 200),
                    [0.0, -88.0, 20.0]]).astype(np.float32)


def test_softplus_approximation_matches_float64_including_tiny_exp():
    """The Triton formula, evaluated op by op in numpy float32 (XLA's CPU simplifier would fold its (1 + w) - 1)."""
    x = X
    w = np.exp2(np.abs(x) * np.float32(-1.4426950408889634)).astype(np.float32)
    u = np.float32(1) + w
    with np.errstate(divide="ignore", invalid="ignore"):
        l1p = np.where(u == 1, w, np.log2(u) * np.float32(0.6931471805599453) * w / (u - np.float32(1)))
    got = (np.maximum(x, 0) + l1p.astype(np.float32)).astype(np.float64)
    x64 = x.astype(np.float64)
    want = np.maximum(x64, 0.0) + np.log1p(np.exp(-np.abs(x64)))
    # f32: relative, also where e^-|x| < f32 epsilon next to 1 (the log1p trick); e^-|x| as 2^(-|x| log2 e) carries
    # the product's rounding, |x| log2(e) 2^-24 relative: 1.8e-6 at |x| = 30, under 4e-7 for |x| < 5
    small = np.abs(x) < 5
    np.testing.assert_allclose(got[small], want[small], rtol=4e-7, atol=0)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    exact = np.asarray(jax.jit(fastmath.softplus)(x), np.float64)   # off the GPU: the jnp expression
    np.testing.assert_allclose(exact, want, rtol=4e-7, atol=1e-37)


def test_sigmoid_fma_exp2_log2_rcp_match_numpy():
    x64 = X.astype(np.float64)
    np.testing.assert_allclose(np.asarray(jax.jit(fastmath.sigmoid)(X)), 1.0 / (1.0 + np.exp(-x64)), rtol=3e-7,
                               atol=1e-30)
    a, b, c = (jnp.asarray(X), jnp.asarray(X[::-1].copy()), jnp.ones_like(X))
    chex.assert_trees_all_close(fastmath.fma(a, b, c), a * b + c, rtol=1e-6)
    pos = np.abs(X) + 1e-3
    np.testing.assert_allclose(np.asarray(fastmath.exp2(jnp.asarray(X / 4))), np.exp2(x64 / 4), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fastmath.log2(jnp.asarray(pos))), np.log2(pos.astype(np.float64)),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(fastmath.rcp(jnp.asarray(pos))), 1.0 / pos.astype(np.float64), rtol=1e-6)


def _kernel(x_ref, y_ref):
    x = x_ref[...]
    y_ref[...] = fastmath.fma(fastmath.softplus(x), fastmath.sigmoid(x), fastmath.rcp(fastmath.exp2(x) + 1.0))


def _call(interpret):
    return pl.pallas_call(_kernel, out_shape=jax.ShapeDtypeStruct((64,), jnp.float32), interpret=interpret,
                          compiler_params=pltr.CompilerParams(num_warps=1, num_stages=1))


def test_pallas_interpret_and_triton_lowering():
    x = jnp.asarray(X[:64])
    want = jax.nn.softplus(x) * jax.nn.sigmoid(x) + 1.0 / (jnp.exp2(x) + 1.0)
    chex.assert_trees_all_close(_call(True)(x), want, rtol=2e-6, atol=1e-7)
    with abstract_h100():
        lowered = jax.jit(_call(False)).trace(jax.ShapeDtypeStruct((64,), jnp.float32)).lower(
            lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 1
