"""`abstract_h100()`: lowering for an NVIDIA H100 without one. Inside the context, `jax.jit(f).trace(...).lower(
lowering_platforms=("cuda",))` lowers the GPU path, Pallas Triton kernels included, so tests catch lowering errors
that Pallas' interpret mode hides. One definition for every kernel test (imported as a sibling module: pytest puts
tests/ on sys.path for its conftest)."""

import jax
from jax.sharding import AbstractMesh

try:
    from jax.sharding import AbstractDevice
except ImportError:  # jax 0.10
    from jax._src.sharding_impls import AbstractDevice

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def abstract_h100():
    """A context with a one-device abstract mesh of an H100 (axis "x")."""
    return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100))
