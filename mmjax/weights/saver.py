"""``save_pretrained``: an mmjax model -> an HF checkpoint directory in the layout it came from.

A loaded model carries a :class:`~mmjax.weights.layouts.SourceRecord`: the same keys are written
with the same shard names and grouping (plus ``model.safetensors.index.json`` when the source was
sharded), each tensor in its original dtype unless ``dtype`` overrides it, the original
``config.json`` text (``torch_dtype`` / ``dtype`` rewritten only when the dtype changes), and copies
of the tokenizer / generation / processor / remote-code files. Files are written one at a time and
tensor by tensor: a stacked parameter is sliced on device and only the slice comes to host.

A model built from scratch (no record) is saved from its own ``weight_rules`` given ``layout`` and
``hf_config`` (or the model's ``hf_config()`` hook), as one ``model.safetensors`` or, with
``max_shard_size``, as shards named the way transformers names them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

from mmjax.weights import layouts
from mmjax.weights.rules import get_path, to_hf
from mmjax.weights.safetensors_io import (INDEX_FILE, SINGLE_FILE, CheckpointError, dtype_name, np_dtype,
                                          write_file, write_index)

_FLOAT = ("F64", "F32", "F16", "BF16")
_CONFIG_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_SUBCONFIGS = ("llm_config", "vision_config", "text_config")


def _mm_to_hf_shape(rule, shape):
    if rule.transform == "linear":
        return tuple(reversed(shape))
    if rule.transform == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def export_dtype(dtype) -> str | None:
    """The safetensors dtype name ``save_pretrained(dtype=)`` converts floating tensors to (None:
    each keeps its own); ``CheckpointError`` for anything but a floating dtype."""
    if dtype is None or dtype == "":
        return None
    override = dtype_name(dtype)
    if override not in _FLOAT:
        raise CheckpointError(f"export dtype must be a floating dtype ({', '.join(_FLOAT)}), got {dtype!r}")
    return override


def _out_dtype(orig: str, override: str | None) -> str:
    return override if (override is not None and orig in _FLOAT) else orig


def updated_config_text(text: str, new_dtype: str | None) -> str:
    """``config.json`` text with ``torch_dtype`` / ``dtype`` set to ``new_dtype`` (top level and the
    nested llm/vision/text configs, only where the field exists); the original text if nothing changes."""
    if new_dtype is None:
        return text
    name = _CONFIG_DTYPE_NAMES[new_dtype]
    cfg = json.loads(text)
    changed = False
    for d in [cfg] + [cfg[k] for k in _SUBCONFIGS if isinstance(cfg.get(k), dict)]:
        for field in ("torch_dtype", "dtype"):
            if field in d and d[field] != name:
                d[field] = name
                changed = True
    return json.dumps(cfg, indent=2) + "\n" if changed else text


def _shard_plan(entries, max_shard_size: int | None):
    """Group ``(key, dtype, shape)`` into transformers-style shard files."""
    if not max_shard_size:
        return [(SINGLE_FILE, [e[0] for e in entries])], False
    groups, cur, size = [], [], 0
    for key, dt, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype(dt).itemsize
        if cur and size + nbytes > max_shard_size:
            groups.append(cur)
            cur, size = [], 0
        cur.append(key)
        size += nbytes
    if cur:
        groups.append(cur)
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])], False
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)], True


def record_from_model(model, layout: str, hf_config: dict | str, dtype: str | None = None,
                      max_shard_size: int | None = None) -> layouts.SourceRecord:
    """A SourceRecord describing how to write a model that was not loaded from a checkpoint."""
    from flax import nnx
    params = nnx.state(model, nnx.Param)
    entries = []
    for key, (rule, layer) in layouts.weight_table(model).items():
        var = get_path(params, rule.path)
        shape = tuple(var.shape) if layer is None else tuple(var.shape[1:])
        entries.append((key, dtype or dtype_name(np.dtype(var.dtype)), _mm_to_hf_shape(rule, shape)))
    plan, sharded = _shard_plan(entries, max_shard_size)
    info = {k: (dt, s) for k, dt, s in entries}
    tensors = tuple(layouts.TensorEntry(k, *info[k], fname) for fname, keys in plan for k in keys)
    text = hf_config if isinstance(hf_config, str) else json.dumps(hf_config, indent=2) + "\n"
    total = sum(int(np.prod(s, dtype=np.int64)) * np_dtype(dt).itemsize for _, dt, s in entries)
    return layouts.SourceRecord(
        source_dir="", layout=layout, config_json=text, tensors=tensors, sharded=sharded,
        index_metadata_json=json.dumps({"total_size": total}) if sharded else None,
        file_metadata=tuple((fname, json.dumps({"format": "pt"})) for fname, _ in plan))


def _clean_old_weights(out_dir: str, keep: set[str]) -> None:
    import re
    pat = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
    for name in os.listdir(out_dir):
        if pat.match(name) and name not in keep:
            os.remove(os.path.join(out_dir, name))


def copy_aux_files(src_dir: str, out_dir: str) -> list[str]:
    """Copy tokenizer / generation / processor / ``*.py`` files; returns the names copied."""
    if not src_dir or not os.path.isdir(src_dir):
        if src_dir:
            logging.warning("source directory %s is gone: tokenizer/generation files not copied", src_dir)
        return []
    if os.path.realpath(src_dir) == os.path.realpath(out_dir):
        return []
    names = layouts.aux_files(src_dir)
    for name in names:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    return names


def save_pretrained(model, out_dir, dtype: str | None = None, *, layout: str | None = None,
                    hf_config: dict | str | None = None, max_shard_size: int | None = None,
                    aux_dir: str | None = None) -> str:
    """Write ``model`` as an HF checkpoint directory; returns ``out_dir``.

    Args:
      model: an mmjax model; one returned by ``from_pretrained`` remembers its layout.
      out_dir: created if missing; existing ``model*.safetensors`` / index files there are replaced.
      dtype: ``None`` keeps each tensor's original dtype; ``"bfloat16"`` / ``"float32"`` converts all
        floating tensors and updates ``torch_dtype`` / ``dtype`` in config.json.
      layout, hf_config: for a model without a source record (built from a config): the layout
        (``causal_lm`` / ``internvl_chat`` / ``internvl_hf``) and the HF config (dict or JSON text).
        If omitted, the model's ``hf_config()`` / ``hf_layout`` hooks are used when present.
      max_shard_size: bytes per shard for models without a record (a loaded model keeps its shards).
      aux_dir: directory to copy tokenizer etc. files from (default: the record's source directory).
    """
    import jax
    from flax import nnx

    if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
        raise CheckpointError("model carries LoRA adapters: merge them first (mmjax.models.lora.merge_lora) "
                              "or write them with mmjax.weights.peft_io.save_peft_adapter")
    out_dir = os.fspath(out_dir)
    override = export_dtype(dtype)
    record = layouts.source_record(model)
    if record is None:
        if hf_config is None and callable(getattr(model, "hf_config", None)):
            hf_config = model.hf_config()
        layout = layout or getattr(model, "hf_layout", None)
        if hf_config is None or layout is None:
            raise CheckpointError("model has no source record (not loaded by from_pretrained): pass layout= "
                                  f"(one of {layouts.LAYOUTS}) and hf_config= to save_pretrained")
        if layout not in layouts.LAYOUTS:
            raise CheckpointError(f"unknown layout {layout!r}; one of {layouts.LAYOUTS}")
        record = record_from_model(model, layout, hf_config, dtype=override, max_shard_size=max_shard_size)
    elif layout is not None and layout != record.layout:
        raise CheckpointError(f"model was loaded from the {record.layout} layout; writing {layout} is not supported")

    table = layouts.weight_table(model)
    to_table = layouts.key_canonicalizer(record.layout)
    carried = {t.key for t in record.tensors if layouts.carried_key(record.layout, t.key)}
    canon = {t.key: to_table(t.key) for t in record.tensors if t.key not in carried}  # record key -> table key
    source = _carried_source(record, carried)
    covered = set(canon.values())
    for key in table:
        if key not in covered:
            raise CheckpointError(f"model tensor {key} is not in the source checkpoint's key list")
    for key, c in canon.items():
        if c not in table:
            raise CheckpointError(f"source checkpoint tensor {key} has no mmjax parameter in this model")

    params = nnx.state(model, nnx.Param)

    def specs_of(entries):
        specs = {}
        for t in entries:
            if t.key in carried:
                specs[t.key] = (_out_dtype(t.dtype, override), tuple(t.shape))
                continue
            rule, layer = table[canon[t.key]]
            var = get_path(params, rule.path)
            shape = tuple(var.shape) if layer is None else tuple(var.shape[1:])
            specs[t.key] = (_out_dtype(t.dtype, override), _mm_to_hf_shape(rule, shape))
        return specs

    def produce(key):
        if key in carried:
            return source.get(key)      # cast to the spec's dtype (if overridden) by write_file
        rule, layer = table[canon[key]]
        value = get_path(params, rule.path).get_value()
        if layer is not None:
            value = value[layer]           # slice on device; only the slice comes to host
        return to_hf(rule, np.asarray(value))

    os.makedirs(out_dir, exist_ok=True)
    by_file: dict[str, list] = {}
    for t in record.tensors:
        by_file.setdefault(t.file, []).append(t)
    _clean_old_weights(out_dir, keep=set(by_file) | ({INDEX_FILE} if record.sharded else set()))
    total, weight_map = 0, {}
    for fname, entries in by_file.items():
        meta = record.metadata_of(fname)
        total += write_file(os.path.join(out_dir, fname), specs_of(entries), produce,
                            metadata=meta if meta is not None else {"format": "pt"})
        weight_map.update((t.key, fname) for t in entries)
    if record.sharded:
        meta = record.index_metadata or {}
        if "total_size" in meta or not meta:
            meta["total_size"] = total
        write_index(out_dir, weight_map, meta)

    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write(updated_config_text(record.config_json, override if override != _common_dtype(record) else None))
    if source is not None:
        source.close()
    copy_aux_files(aux_dir if aux_dir is not None else record.source_dir, out_dir)
    return out_dir


def _carried_source(record: layouts.SourceRecord, carried: set[str]):
    """A reader of the source checkpoint for the carried tensors (None when there are none)."""
    if not carried:
        return None
    from mmjax.weights.safetensors_io import ShardedReader
    try:
        return ShardedReader(record.source_dir)
    except (CheckpointError, OSError) as e:
        raise CheckpointError(f"{len(carried)} tensors (e.g. {sorted(carried)[0]}) are carried unchanged from the "
                              f"source checkpoint {record.source_dir}, which cannot be read now ({e})") from None


def _common_dtype(record: layouts.SourceRecord) -> str | None:
    """The single floating dtype of the source tensors (None when mixed)."""
    dts = {t.dtype for t in record.tensors if t.dtype in _FLOAT}
    return dts.pop() if len(dts) == 1 else None


__all__ = ["save_pretrained", "record_from_model", "updated_config_text", "copy_aux_files"]
