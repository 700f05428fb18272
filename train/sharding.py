"""Device mesh (data, fsdp, tensor) and logical-axis rules (MaxText style).

Parameters and activations carry *logical* axis names; ``LOGICAL_RULES`` maps each name to mesh axes:

* DP: the batch is split over ``data`` *and* ``fsdp`` (FSDP is data parallel with sharded weights);
* FSDP / ZeRO-3: every weight's ``embed`` dimension is split over ``fsdp`` (params, grads and optimizer state
  are all sharded the same way; XLA inserts the all-gathers / reduce-scatters);
* TP: attention heads, ffn (``mlp``), vocabulary and experts are split over ``tensor``.

A dimension whose size is not divisible by the mesh axes its name maps to is left replicated (reported once),
so the same rules work for any mesh.  An unknown logical name is an error naming it.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_experts", "tensor"),
    ("activation_keys", None),
    ("batch", ("data", "fsdp")),
    ("length", None),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("bias_heads", "tensor"),
    ("head_dim", None),
    ("kv", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("experts", "tensor"),
    ("expert_keys", None),
    ("expert_heads", None),  # product-key CDMoE query heads (Cheems)
    ("keys", None),
    ("norm", None),
    ("scale", None),
    ("layers", None),
    # OTCE selective-SSM mixer (wmjax/layers/selective_mixer.py): inner channels E, state N, dt rank R, conv taps
    ("mamba_inner", None),
    ("mamba_state", None),
    ("mamba_rank", None),
    ("mamba_conv", None),
    (None, None),
)


def rules_dict(rules=LOGICAL_RULES) -> dict:
    return {k: v for k, v in rules}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all); one axis may be -1 (the rest).

    Raises :class:`ConfigError` naming ``mesh.data/fsdp/tensor``, their product and the device count when the
    sizes do not multiply to the number of devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    where = f"{n} {devices[0].platform if devices else ''} device(s)"
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"mesh.data/fsdp/tensor = {'/'.join(map(str, sizes))}: the fixed axes' product "
                              f"{known} does not divide the {where} available")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(f"mesh.data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but {where} "
                          f"are available: make the product {n}, or set one axis to -1 to fill")
    try:
        arr = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:
        arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def _axes_of(rule) -> tuple:
    if rule is None:
        return ()
    if isinstance(rule, str):
        return (rule,)
    return tuple(rule)


_warned: set = set()


def logical_to_spec(names, shape, mesh: Mesh, rules=LOGICAL_RULES, where: str = "", warn=print) -> P:
    """Map one array's logical axis names to a PartitionSpec, dropping non-divisible / reused axes."""
    rd = rules_dict(rules)
    if names is None:
        return P()
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"{where}: {len(names)} logical axis names {names} for an array of shape {tuple(shape)}")
    used: set = set()
    spec = []
    for name, dim in zip(names, shape):
        if name not in rd:
            raise ValueError(f"{where}: unknown logical axis name {name!r} (known: "
                             f"{', '.join(sorted(str(k) for k in rd if k is not None))}); add a rule in "
                             f"train/sharding.py LOGICAL_RULES")
        axes = tuple(a for a in _axes_of(rd[name]) if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        # keep the longest prefix of axes whose product divides the dimension
        keep = []
        for a in axes:
            if dim % (math.prod(mesh.shape[x] for x in keep) * mesh.shape[a]) == 0:
                keep.append(a)
            else:
                key = (where, name, dim, a)
                if key not in _warned and warn is not None:
                    _warned.add(key)
                    warn(f"[sharding] {where}: dim {name}={dim} not divisible by mesh axis {a}={mesh.shape[a]}; "
                         f"left unsharded on that axis")
                break
        used.update(keep)
        spec.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def path_str(path) -> str:
    """A tree path as 'a/b/c' (dict keys, attribute names or indices)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def is_axes_leaf(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x))


def param_shardings(logical_axes, shapes, mesh: Mesh, rules=LOGICAL_RULES, warn=print):
    """Pytree of NamedSharding for params given their logical axes and shapes (ShapeDtypeStructs or arrays)."""
    flat_axes = jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=is_axes_leaf)[0]
    axes_by_path = {path_str(p): a for p, a in flat_axes}

    def one(path, x):
        ps = path_str(path)
        if ps not in axes_by_path:
            raise ValueError(f"param {ps}: no logical axes given by param_logical_axes")
        return NamedSharding(mesh, logical_to_spec(axes_by_path[ps], x.shape, mesh, rules, where=f"param {ps}",
                                                   warn=warn))

    return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def flax_rules(rules=LOGICAL_RULES) -> tuple:
    """Rules in the form ``flax.linen.logical_axis_rules`` expects (names with no mesh axis map to None)."""
    return tuple((k, v) for k, v in rules if k is not None)


def distributed_init(force: bool = False, log=print) -> None:
    """``jax.distributed.initialize()`` when a multi-host environment is detected (no-op on one host).

    JAX itself reads the usual cluster variables (SLURM, Open MPI, GKE/TPU) and the explicit
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables.
    """
    explicit = os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
               or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
               or bool(os.environ.get("TPU_WORKER_HOSTNAMES")))
    if not (explicit or cluster or force):
        return
    if explicit and os.environ.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    log(f"[dist] process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices")


def opt_state_shardings(opt_shapes, params_shapes, param_sh, mesh):
    """Optimizer-state leaves that mirror a parameter get that parameter's sharding; the rest are replicated."""
    by_path = {}
    for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params_shapes)[0], jax.tree_util.tree_leaves(param_sh)):
        by_path[tuple(path_str(p).split("/"))] = (x.shape, s)
    rep = NamedSharding(mesh, P())

    def one(path, x):
        key = tuple(path_str(path).split("/"))
        for i in range(len(key)):  # the longest suffix of the optimizer-state path that is a parameter path
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_shapes)
