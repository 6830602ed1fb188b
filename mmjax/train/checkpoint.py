"""Orbax checkpoints of a run: train state, data-iterator state and config, saved together.

The train state is stored as a flat ``{key path: array}`` dict, so any pytree (nnx.State with
Param nodes, optax states) round-trips without orbax needing to know its node types; restoring
flattens a freshly built state the same way and fills it. Orbax writes each step into a
temporary directory and renames it when complete, so a kill at any moment (mid-save included)
leaves the previous checkpoint intact and the partial one invisible.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _flat(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): x for p, x in leaves}


class RunCheckpointer:
    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = max(int(every_steps), 1)
        # cleanup_tmp_directories: a save killed midway (or failed on a full disk) leaves a
        # temporary directory; the next run removes it
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        # handlers named up front: a fresh manager can then read one item, or an item's metadata,
        # of a checkpoint it did not write
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def saved_config(self, step: int) -> dict:
        """The config a checkpoint was written with (only that item is read)."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def state_mismatch(self, step: int, target_state) -> str | None:
        """How the checkpoint's train state differs from ``target_state``'s entries and shapes (from
        its metadata alone), or None: a checkpoint of another model or trainable set."""
        tree = self.manager.item_metadata(step)["state"]
        saved = dict(getattr(tree, "tree", tree))
        want = {k: tuple(x.shape) for k, x in _flat(target_state).items()}
        missing = [k for k in want if k not in saved]
        extra = [k for k in saved if k not in want]
        if missing or extra:
            return (f"{len(missing)} entries of this run's state are not in it (e.g. {missing[0]})" if missing else
                    f"it holds {len(extra)} entries this run does not have (e.g. {extra[0]})")
        for k, shape in want.items():
            if tuple(saved[k].shape) != shape:
                return f"{k} is {tuple(saved[k].shape)} there, {shape} here"
        return None

    def set_aside(self, step: int) -> str:
        """Rename a checkpoint that cannot be read to ``<step>.corrupt[-k]`` (kept for inspection,
        invisible to the manager, so the step can be written again)."""
        src = os.path.join(self.directory, str(step))
        dst, k = f"{src}.corrupt", 1
        while os.path.exists(dst):
            dst, k = f"{src}.corrupt-{k}", k + 1
        os.rename(src, dst)
        self.manager.reload()
        return dst

    def should_save(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, data_state: Any, config_dict: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_flat(state)),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_dict)),
            force=force)

    def restore(self, step: int, target_state):
        """Restore into the structure (and shardings) of ``target_state``; returns
        (state, data_state, config_dict)."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(target_state)
        abstract = {jax.tree_util.keystr(p): jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
                    for p, x in leaves}
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        flat = out["state"]
        missing = [k for k in abstract if k not in flat]
        if missing:
            raise ValueError(f"checkpoint {self.directory}/{step} lacks {missing[0]} "
                             f"({len(missing)} state entries missing): was it written by another config?")
        state = jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in leaves])
        return state, out["data"], out["config"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def config_json(config) -> dict:
    """The config as plain JSON (tuples become lists)."""
    return json.loads(config.to_json_best_effort() if hasattr(config, "to_json_best_effort") else json.dumps(config))
