"""Every layer of a model calls the same training kernels: the program lowers each kernel once, whatever the depth
(`pallas_kernels.lowering.lower_once`; on jax >= 0.10.3 Pallas compiles Triton while lowering, so a per-layer
lowering was a per-layer compile: OTCE-160M's 15 selective-scan layers gave 30 compiles and no step within 115 s on
an H200). Lowered for an abstract H100 with the ops dispatching as on a GPU."""

import jax
import jax.numpy as jnp
import pytest

from abstract_gpu import abstract_h100
from wmjax.models import get_family

_SHAPES = {  # family -> (preset, {depth field: (shallow, deep)})
    "doge": ("Doge-160M", {"num_hidden_layers": (2, 6)}),
    "cheems": ("Cheems-160M", {"num_hidden_layers": (8, 24)}),     # attention at 7, 15, 23
    "otce": ("OTCE-160M", {"num_observation_layers": (2, 6), "num_conseption_layers": (1, 4)}),
}


def _triton_calls(name, depth, monkeypatch):
    preset, fields = _SHAPES[name]
    fam = get_family(name)
    cfg = fam.config_cls.preset(preset, vocab_size=512, **{k: v[depth] for k, v in fields.items()})
    model = fam.model_cls(cfg, dtype=jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(ids.shape, ids.dtype)))

    def loss(p, x):
        return jnp.mean(model.apply(p, x)[0].astype(jnp.float32))

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # the ops pick their Pallas kernels, not interpret
    with abstract_h100():
        text = jax.jit(jax.grad(loss)).trace(params, ids).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("name", sorted(_SHAPES))
def test_each_kernel_lowers_once_whatever_the_depth(name, monkeypatch):
    shallow, deep = _triton_calls(name, 0, monkeypatch), _triton_calls(name, 1, monkeypatch)
    assert shallow > 0, f"{name}: no Pallas kernel in the lowered train step"
    assert deep == shallow, f"{name}: {shallow} Triton kernels at the shallow depth, {deep} at the deep one"
