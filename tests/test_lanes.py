"""`pallas_kernels.lanes`: the lane exchange and the reduce-scatter, as tile operations (the CPU semantics; the
selective-scan backward's GPU check covers the Triton layout)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lanes import lane_xor, reduce_scatter


def test_lane_xor_permutes_the_axis():
    v = jnp.arange(4 * 8, dtype=jnp.float32).reshape(4, 8)
    for m in (1, 2, 4):
        want = np.asarray(v)[:, np.arange(8) ^ m]
        chex.assert_trees_all_equal(lane_xor(v, 1, m, lane_stride=1), jnp.asarray(want))
    with pytest.raises(ValueError, match="cannot be xor'ed by 8"):
        lane_xor(v, 1, 8, lane_stride=1)


@pytest.mark.parametrize("n_items,lanes", [(16, 8), (8, 8), (4, 8), (1, 4), (32, 4)])
def test_reduce_scatter_sums_every_item(n_items, lanes):
    """Each lane's slot j holds the lane-sum of item origin(j); together the lanes cover every item (the rest of the
    lanes, when items are fewer than lanes, hold copies)."""
    rng = np.random.default_rng(n_items * 10 + lanes)
    items = [jnp.asarray(rng.standard_normal((3, lanes)), jnp.float32) for _ in range(n_items)]
    sums, origin = reduce_scatter(items, axis=1, lane_stride=1)
    assert len(sums) == max(1, n_items // lanes)
    seen = set()
    for j, s in enumerate(sums):
        o = np.asarray(origin(j))
        chex.assert_shape(s, (3, lanes))
        for e in range(3):
            for lane in range(lanes):
                item = int(o[e, lane])
                np.testing.assert_allclose(float(s[e, lane]), float(items[item][e].sum()), rtol=1e-6, atol=1e-6)
                seen.add(item)
    assert seen == set(range(n_items))
