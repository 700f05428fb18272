"""orbax-checkpoint: async saves every N steps, keep the last K, resume from the latest good checkpoint.

A checkpoint holds two items: ``state`` (params, optimizer state, step, RNG key: sharded arrays, written and
restored by every host through orbax) and ``meta`` (JSON: step, data position, config, tokenizer path).
orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
no half-written step behind.  A step that is present but cannot be restored (deleted or truncated files, bad
metadata) is reported and the previous one is tried.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True, log: Callable = print):
        self.directory = os.path.abspath(directory)
        self.log = log
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            cleanup_tmp_directories=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> bool:
        return self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self):
        self.mngr.wait_until_finished()

    def restore(self, step: int, abstract_state: Any):
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest_good(self, abstract_state: Any, validate: Optional[Callable[[Any, dict], None]] = None):
        """Restore the newest step that restores cleanly; report each bad one.  Returns (step, state, meta) or None."""
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state)
                if validate is not None:
                    validate(state, meta)
                return step, state, meta
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                self.log(f"[checkpoint] step {step} in {self.directory} is corrupt or partial and was skipped "
                         f"({type(e).__name__}: {msg}); trying the previous one")
        if steps:
            self.log(f"[checkpoint] no restorable checkpoint among steps {steps}; starting from scratch")
        return None

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def abstract_like(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
