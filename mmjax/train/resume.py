"""What a restart resumes: the newest intact checkpoint of the workdir, written by the same run.

A checkpoint holds the config that wrote it. Before anything is restored it is compared with the
config of this run:
  * a change of what the run *means* (the model and its weights, the trainable set and LoRA, the
    data and how it is batched, the seed) is refused with a one-line diff, unless
    ``config.resume.allow_changes`` names the key (or a section: ``data``);
  * any other change (the optimizer and schedule, the step budget, the mesh, logging, export,
    the performance knobs of ``config.model``) is allowed and said in one line.
A checkpoint that cannot be read (its config, its metadata or its arrays) is renamed
``<step>.corrupt`` with a warning and the previous one is tried; a run with no intact
checkpoint left stops with an error instead of starting over.
"""

from __future__ import annotations

import json
import os

from mmjax.train.setup import ConfigError
from mmjax.weights import CheckpointError

# sections and keys whose change alters what the run trains on, or what it trains
MEANING = ("model_path", "tokenizer_path", "synthetic", "seed", "model", "freeze", "lora", "data")
# ... except these, which change how fast it runs or what it reports, not what it computes
HOW = ("model.remat", "model.attention", "model.attention_block", "model.token_chunk", "model.vit_attention",
       "model.vit_attention_block", "model.vit_tile_chunk", "model.dtype", "data.num_workers", "data.check_files")
NOT_COMPARED = ("resume",)   # the resume settings themselves


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every setting both configs hold with different values
    (a key only one side knows is a newer or older mmjax, not a change)."""
    a, b = _flat(saved), _flat(current)
    return [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and not _under(k, NOT_COMPARED)]


def allowed_names(cfg) -> list[str]:
    """``config.resume.allow_changes``: keys or sections, comma-separated (or a list in a config file)."""
    raw = cfg.get("resume", {}).get("allow_changes", "") if hasattr(cfg, "get") else ""
    names = raw.split(",") if isinstance(raw, str) else list(raw)
    return [n.strip() for n in names if n.strip()]


def _show(v, other) -> str:
    """``v`` as JSON, long strings cut to where they differ from ``other``."""
    text = json.dumps(v)
    if len(text) <= 60:
        return text
    if isinstance(v, str) and isinstance(other, str):
        same = len(os.path.commonprefix([v, other]))
        start = max(0, same - 20)
        return json.dumps(("..." if start else "") + v[start:start + 57])
    return text[:57] + "..."


def _diff(changes) -> str:
    return ", ".join(f"{k} {_show(old, new)} -> {_show(new, old)}" for k, old, new in changes)


def check_config(saved: dict, current: dict, allow: list[str], where: str) -> list[str]:
    """Refuse (``ConfigError``) a change of meaning not in ``allow``; returns the notes to print."""
    changes = config_changes(saved, current)
    refused = [c for c in changes if _under(c[0], MEANING) and not _under(c[0], HOW) and not _under(c[0], allow)]
    diff = _diff
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(f"{where} was written by a run with other settings: {diff(refused)}; resume with the "
                          f"same settings, start in another --workdir, or allow the change with "
                          f"--config.resume.allow_changes={keys}")
    return [f"resuming with changed settings: {diff(changes)}"] if changes else []


def restore_latest(run, checkpointer, cfg_json: dict) -> tuple[int, list[str]]:
    """Restore the newest intact checkpoint into ``run.state`` and the loader; (its step or 0, notes)."""
    steps = checkpointer.steps()
    notes, unreadable = [], []
    allow = allowed_names(run.cfg)
    for step in steps:
        where = f"{checkpointer.directory}/{step}"
        try:
            saved = checkpointer.saved_config(step)
            mismatch = checkpointer.state_mismatch(step, run.state)
        except Exception as e:   # noqa: BLE001 - anything unreadable: try the previous one
            unreadable.append((step, e))
            continue
        notes += check_config(saved, cfg_json, allow, where)
        if mismatch:
            raise CheckpointError(f"{where} holds another train state than this config builds ({mismatch}): an "
                                  "allowed change altered the model or its trainable set; start in another --workdir")
        try:
            run.state, data_state, _ = checkpointer.restore(step, run.state)
        except Exception as e:   # noqa: BLE001
            unreadable.append((step, e))
            continue
        try:
            run.loader.set_state(data_state)
        except ValueError as e:
            raise ConfigError(f"{where}: the data loader's saved position does not fit this run: {e}") from None
        for bad, e in unreadable:
            moved = checkpointer.set_aside(bad)
            notes.append(f"warning: checkpoint {checkpointer.directory}/{bad} cannot be read "
                         f"({type(e).__name__}: {str(e)[:160]}); set aside as {moved}, resuming from step {step}")
        return step, notes
    if unreadable:
        bad, e = unreadable[0]
        raise CheckpointError(f"no intact checkpoint in {checkpointer.directory}: step {bad} cannot be read "
                              f"({type(e).__name__}: {str(e)[:160]})"
                              + (f", nor {len(unreadable) - 1} earlier ones" if len(unreadable) > 1 else "")
                              + "; move the directory away to start over")
    return 0, notes
