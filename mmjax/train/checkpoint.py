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
        options = ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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
