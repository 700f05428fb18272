"""Training checkpoints (orbax): saves with array checksums, restore of the newest good step, a run's params.

    ckpt = Checkpointer(dir, keep=3); ckpt.save(step, state, meta)          # meta: JSON-able dict
    step, state, meta = ckpt.restore_latest_good(abstract_state, validate)  # or None: no readable step
    run = load_run("runs/tiny")   # run dir, its checkpoints/ dir or a step dir -> RunCheckpoint(config, params, ...)

A step directory holds two orbax items: ``state`` (params, optimizer state, step, RNG key: sharded arrays, written
and read by every host) and ``meta`` (JSON: the caller's dict plus ``checksums``).  ``checksums`` maps every leaf
of ``state`` by its path ("params/model/embed_tokens/embedding") to two 32-bit sums over the words u_i of the
leaf's bits (i = flat row-major index; narrower dtypes zero-extended, 64-bit ones split):

    s1 = sum_i u_i  mod 2^32        s2 = sum_i (2i + 1) u_i  mod 2^32

computed on device by one jit over the whole tree (a sharded or multi-host array is reduced where it lives; one
small transfer).  A single flipped bit changes u_i by +-2^k, so s1 by +-2^k != 0 mod 2^32: it is always caught.
A step whose files cannot be read (truncated, deleted metadata) or whose restored arrays fail the check is moved
aside to ``<step>.corrupt`` (process 0; ``.corrupt.2``... if taken) with a one-line message, and the previous step
is tried: training (``restore_latest_good``), sampling and conversion (``load_run``) all fall back this way.
A step that does not fit the caller's tree (another model or optimizer) is an error, not a corrupt step.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from wmjax.config import DogeConfig
from wmjax.models import registry

__all__ = ["Checkpointer", "CheckpointError", "CheckpointCorrupt", "RunCheckpoint", "abstract_like", "load_run",
           "find_checkpoints", "tree_checksums"]


class CheckpointError(ValueError):
    """A checkpoint path or step that cannot be used as asked (missing, wrong tree); the message names it."""


class CheckpointCorrupt(CheckpointError):
    """A step whose files cannot be read or whose arrays fail their checksum."""


# --------------------------------------------------------------------------------------------------------------
# checksums


def _path_str(path) -> str:
    """'params/model/layers_0/...' for a tree path (dict keys, attributes and indices alike, as orbax names them)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _words(x):
    """x's bits as uint32 words, shape x.shape (+ (n,) for dtypes wider than 4 bytes)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


@jax.jit
def _sums(leaves):
    """[n_leaves, 2] uint32: (s1, s2) of each leaf (module docstring). No reshape: sharded arrays stay in place."""
    out = []
    for x in leaves:
        w = _words(x)
        idx = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):
            idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % (1 << 32))
            stride *= w.shape[d]
        out.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def tree_checksums(tree) -> dict[str, str]:
    """{leaf path: 16 hex digits (s1, s2)} for every array leaf of ``tree``; the same on every host."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    out = _sums([x for _, x in flat])
    host = np.asarray(out if out.is_fully_addressable else out.addressable_data(0))  # replicated after the sums
    return {_path_str(p): f"{int(a):08x}{int(b):08x}" for (p, _), (a, b) in zip(flat, host)}


# --------------------------------------------------------------------------------------------------------------
# the checkpointer


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` with ``shardings``: what ``restore`` reads into."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _first_line(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    for cut in (" See full TensorStore details", " [tensorstore_spec"):  # pages of JSON spec follow these
        text = text.split(cut)[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_resource_error(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


_quieted = False


def _quiet_failed_reads():
    """Once: drop the tracebacks orbax's reader leaves behind after a failed read (its tensorstore callbacks
    fire into a closed event loop; its tasks' exceptions are logged again by asyncio), which would bury the
    one-line message.  Everything else still reaches the previous hooks."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    prev = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            prev(u)

    sys.unraisablehook = hook

    class Drop(logging.Filter):
        def filter(self, record):
            if not str(record.msg).startswith("Task exception was never retrieved"):
                return True
            exc = record.exc_info[1] if record.exc_info else None
            return not (exc is not None and ("tensorstore" in str(exc) or "TensorStore" in str(exc)))

    logging.getLogger("asyncio").addFilter(Drop())


class Checkpointer:
    """orbax CheckpointManager over ``directory`` with checksummed saves and a verified, falling-back restore.

    Saves are asynchronous (``async_save``) and atomic (orbax writes a temporary dir and renames it when
    complete); the newest ``keep`` steps are kept (None: all).  ``create=False`` never creates ``directory``.
    """

    def __init__(self, directory: str, keep: Optional[int] = 3, async_save: bool = True, log: Callable = print,
                 create: bool = True):
        self.directory = os.path.abspath(directory)
        self.log = log
        self.options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                    create=create, cleanup_tmp_directories=create)
        self.mngr = ocp.CheckpointManager(self.directory, options=self.options,
                                          item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                         "meta": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest step on disk (not verified: see ``latest_good_step``)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> bool:
        """Write ``state`` and ``meta`` + {"checksums": tree_checksums(state)} as ``step`` (async)."""
        meta = dict(meta, checksums=tree_checksums(state))
        return self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self):
        self.mngr.wait_until_finished()

    def stored_tree(self, step: int) -> dict:
        """Nested dicts of ShapeDtypeStructs (no sharding) of ``step``'s state as written (paths as in checksums)."""
        out: dict = {}
        for path, m in jax.tree_util.tree_flatten_with_path(self.mngr.item_metadata(step)["state"])[0]:
            keys = _path_str(path).split("/")
            node = out
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
        return out

    def restore(self, step: int, abstract_state: Union[Any, Callable[[dict], Any]], partial: bool = False):
        """(state, meta) of ``step``, read into ``abstract_state`` (ShapeDtypeStructs with shardings) and checked.

        ``abstract_state`` may be a function of ``stored_tree(step)``; ``partial``: it may hold a subset of the
        stored leaves (e.g. only "params").  Raises CheckpointCorrupt (unreadable, checksum mismatch) or
        CheckpointError (the stored tree does not fit: different shapes, dtypes or leaves).
        """
        where = f"step {step} in {self.directory}"
        try:
            meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = self.stored_tree(step)
        except Exception as e:  # noqa: BLE001 - unreadable meta / metadata: the step is unusable
            if _is_resource_error(e):
                raise
            raise CheckpointCorrupt(f"unreadable metadata ({_first_line(e)})") from None
        if not isinstance(meta, dict):
            raise CheckpointCorrupt(f"meta is a {type(meta).__name__}, not a JSON object")
        sums = meta.get("checksums")
        have = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
        # the leaves are recorded twice (orbax's array metadata, our checksums): if they disagree, files are damaged
        if not have:
            raise CheckpointCorrupt("no array metadata (state/_METADATA missing or empty)")
        if sums is not None and set(sums) != set(have):
            lost = sorted(set(sums) ^ set(have))
            raise CheckpointCorrupt(f"the array metadata lists {len(have)} arrays, the checksums {len(sums)} "
                                    f"(first difference: {lost[0]})")
        abstract = abstract_state(stored) if callable(abstract_state) else abstract_state
        want = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        missing = sorted(set(want) - set(have))
        extra = [] if partial else sorted(set(have) - set(want))
        differ = [k for k in want if k in have and (tuple(want[k].shape) != tuple(have[k].shape)
                                                    or jnp.dtype(want[k].dtype) != jnp.dtype(have[k].dtype))]
        if missing or extra or differ:
            k = (differ or missing or extra)[0]
            what = (f"{k} is {have[k].dtype}{list(have[k].shape)} there, {want[k].dtype}{list(want[k].shape)} here"
                    if differ else f"{k} is {'not in the checkpoint' if missing else 'in the checkpoint only'}")
            n = len(missing) + len(extra) + len(differ)
            raise CheckpointError(f"{where} does not fit this model/optimizer: {what}"
                                  f"{f' (+{n - 1} more)' if n > 1 else ''}")
        try:
            args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                          partial_restore=partial)
            state = self.mngr.restore(step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:  # noqa: BLE001 - any read failure means the step is unusable
            if _is_resource_error(e):
                raise
            if "structures do not match" in str(e):  # same leaves, other containers: the caller's tree, not the files
                raise CheckpointError(f"{where} does not fit the tree asked for ({_first_line(e)})") from None
            _quiet_failed_reads()
            raise CheckpointCorrupt(f"unreadable arrays ({_first_line(e)})") from None
        if sums is None:
            self.log(f"[checkpoint] {where} has no checksums (written before they existed): not verified")
        else:
            got = tree_checksums(state)
            bad = [k for k, v in got.items() if sums.get(k) != v]
            if bad:
                more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
                raise CheckpointCorrupt(f"checksum mismatch in {bad[0]}{more}")
        return state, meta

    def move_aside(self, step: int, reason: str) -> str:
        """Rename ``<dir>/<step>`` to ``<step>.corrupt`` (process 0; a free ``.corrupt.N`` if taken), log one line
        and reload the manager so that it no longer lists the step.  Returns the new path."""
        src = os.path.join(self.directory, str(step))
        dest, n = src + ".corrupt", 1
        while os.path.lexists(dest):
            n += 1
            dest = f"{src}.corrupt.{n}"
        if jax.process_index() == 0:
            os.rename(src, dest)
            self.log(f"[checkpoint] step {step} in {self.directory} is corrupt or partial ({reason}): moved to "
                     f"{dest}; trying the previous step")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.mngr.reload()
        return dest

    def restore_latest_good(self, abstract_state, validate: Optional[Callable[[Any, dict], None]] = None,
                            step: Optional[int] = None, partial: bool = False):
        """(step, state, meta) of the newest step that reads, passes its checksums and ``validate`` (which raises
        CheckpointCorrupt to reject a step), or None.  Each bad step is moved aside (``move_aside``) and the
        previous one tried.  ``step``: that step only (CheckpointError if absent or bad)."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no step {step}; available steps: {steps or 'none'}")
            steps = [step]
        for s in reversed(steps):
            try:
                state, meta = self.restore(s, abstract_state, partial=partial)
                if validate is not None:
                    validate(state, meta)
                return s, state, meta
            except CheckpointCorrupt as e:
                dest = self.move_aside(s, str(e))
                if step is not None:
                    raise CheckpointError(f"step {s} in {self.directory} is corrupt or partial ({e}): moved to "
                                          f"{dest}") from None
        if steps:
            self.log(f"[checkpoint] no readable step among {steps} in {self.directory}")
        return None

    def latest_good_step(self, abstract_state) -> Optional[int]:
        """The newest step that passes ``restore_latest_good`` (bad newer ones are moved aside)."""
        found = self.restore_latest_good(abstract_state)
        return None if found is None else found[0]

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


# --------------------------------------------------------------------------------------------------------------
# a training run's model


class RunCheckpoint(NamedTuple):
    config: DogeConfig
    params: Any  # host-loaded arrays on the default device
    tokenizer: Optional[str]  # the run's tokenizer file, None if it recorded none or it no longer exists
    step: int
    description: str  # "<checkpoints dir> step N"


def find_checkpoints(path: str) -> tuple[str, Optional[int]]:
    """(checkpoints dir, step or None) for a training run dir, its checkpoints dir or one step dir. Creates nothing."""
    p = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(p):
        raise CheckpointError(f"{path}: no such directory")
    if not os.path.isdir(p):
        raise CheckpointError(f"{path}: not a directory (expected a training run dir, its checkpoints/ dir or a "
                              f"step dir)")
    if os.path.isdir(os.path.join(p, "checkpoints")):
        return os.path.join(p, "checkpoints"), None
    cfg_file = os.path.join(p, "config.yaml")  # a run whose checkpoint.dir is elsewhere
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as fh:
                d = ((yaml.safe_load(fh) or {}).get("checkpoint") or {}).get("dir")
        except (OSError, yaml.YAMLError, AttributeError):
            d = None
        if d and os.path.isdir(d):
            return os.path.abspath(d), None
    name = os.path.basename(p)
    if name.isdigit() and os.path.isdir(os.path.join(p, "state")):
        return os.path.dirname(p), int(name)
    if any(n.isdigit() and os.path.isdir(os.path.join(p, n)) for n in os.listdir(p)):
        return p, None
    raise CheckpointError(f"{path}: no training checkpoints here (expected a run dir holding checkpoints/, a "
                          f"checkpoints dir holding step dirs, or a step dir)")


def load_run(path: str, step: Optional[int] = None, log: Callable = print) -> RunCheckpoint:
    """The params, model config and tokenizer of a training run's newest good step (``step``: that one).

    ``path``: a run dir, its checkpoints/ dir or a step dir (the step dir's step, unless ``step`` differs: error).
    Bad steps are moved aside and the previous one is used, as in training (``Checkpointer.restore_latest_good``;
    only the params' checksums are checked).  Raises CheckpointError with a one-line message; creates nothing.
    """
    ckpt_dir, path_step = find_checkpoints(path)
    if step is not None and path_step is not None and step != path_step:
        raise CheckpointError(f"{path} is step {path_step}, but step {step} was asked for")
    step = path_step if step is None else step
    ck = Checkpointer(ckpt_dir, keep=None, async_save=False, log=log, create=False)
    try:
        steps = ck.all_steps()
        if not steps:
            raise CheckpointError(f"{ckpt_dir}: no checkpoint steps")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def params_only(stored):
            if "params" not in stored:
                raise CheckpointError(f"{ckpt_dir}: the state holds no 'params' (not a wmjax train checkpoint?)")
            return {"params": jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), stored["params"])}

        found = ck.restore_latest_good(params_only, step=step, partial=True)
    finally:
        ck.close()
    if found is None:
        raise CheckpointError(f"{ckpt_dir}: no readable step among {steps} (the bad ones are now <step>.corrupt)")
    s, state, meta = found
    if "model_config" not in meta:
        raise CheckpointError(f"{ckpt_dir}/{s}: its meta has no model_config (not a wmjax train checkpoint?)")
    tok = meta.get("tokenizer")
    if tok and not os.path.isfile(tok):
        log(f"[checkpoint] the run's tokenizer {tok} no longer exists")
        tok = None
    family = registry.get_family(meta.get("model_family", "doge"))  # runs written before the families: Doge
    return RunCheckpoint(family.config_cls.from_dict(meta["model_config"]), state["params"], tok or None, s,
                         f"{ckpt_dir} step {s}")
