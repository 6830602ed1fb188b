"""``from_pretrained``: an HF checkpoint directory -> an mmjax model, streamed tensor by tensor.

Steps: check the directory (config.json, safetensors files, headers against file sizes), detect the
layout, build the model abstractly (``nnx.eval_shape``: no parameter memory), check the key sets and
shapes from the headers alone, then read -> convert (``rules.to_mmjax``) -> cast -> place one tensor
at a time. A stacked parameter (leading ``layers`` axis) fills a preallocated host buffer slice by
slice and is placed once it is complete, then freed; at no point is the checkpoint held twice.

Placement goes through ``sharding_fn(path, shape, dtype) -> jax.sharding.Sharding | None`` when given,
else the default device (the trainer places the loaded parameters on its mesh afterwards).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from mmjax.dtypes import model_dtype
from mmjax.weights import layouts
from mmjax.weights.rules import to_mmjax
from mmjax.weights.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, ShardedReader


def _hf_shape(rule, mm_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that ``to_mmjax(rule, .)`` turns into ``mm_shape``."""
    if rule.transform == "linear":
        return tuple(reversed(mm_shape)) if len(mm_shape) == 2 else (-1,)
    if rule.transform == "conv":
        return (mm_shape[3], mm_shape[2], mm_shape[0], mm_shape[1]) if len(mm_shape) == 4 else (-1,)
    return tuple(mm_shape)


def check_directory(path) -> str:
    """Validate a checkpoint directory before touching the model; returns it as a string."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        name = os.path.basename(os.path.normpath(path)) or "<name>"
        raise CheckpointError(
            f"checkpoint directory {path} does not exist; download it first, e.g. "
            f"`huggingface-cli download OpenGVLab/{name} --local-dir pretrained/{name}`")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"missing config.json in {path} (an HF checkpoint directory needs its config)")
    has_st = os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))
    if not has_st:
        bins = [n for n in os.listdir(path) if n.endswith(".bin") or n.endswith(".pt") or n.endswith(".pth")]
        if bins:
            raise CheckpointError(
                f"{path} holds only PyTorch pickle weights ({bins[0]}); mmjax reads safetensors only. Convert "
                f"once with transformers: AutoModel.from_pretrained(dir, trust_remote_code=True)"
                f".save_pretrained(out_dir, safe_serialization=True), and copy the tokenizer files")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    return path


def read_config(path: str) -> tuple[dict, str]:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text), text
    except ValueError as e:
        raise CheckpointError(f"config.json in {path} is not valid JSON ({e})") from None


def _check_lora(keys) -> None:
    for key in keys:
        if ".base_layer." in key or ".lora_A." in key or ".lora_B." in key or key.endswith((".lora_A", ".lora_B")):
            raise CheckpointError(
                f"tensor {key}: checkpoint still carries peft LoRA weights; merge them first (upstream "
                f"internvl_chat/tools/merge_lora.py, or peft merge_and_unload() then save_pretrained)")


def check_keys(reader: ShardedReader, table: dict, state, canon: dict[str, str]) -> None:
    """Missing / unexpected keys and shape mismatches, from the headers alone (no data read).

    ``canon`` maps each checkpoint key to its ``table`` key (identity except for spelling variants)."""
    from mmjax.weights.rules import get_path
    ckpt = reader.weight_map
    _check_lora(ckpt)
    where = INDEX_FILE if reader.sharded else SINGLE_FILE
    seen: dict[str, str] = {}
    for key, c in canon.items():
        if c in seen:
            raise CheckpointError(f"tensors {seen[c]} and {key} in {reader.directory} both name parameter {c}")
        seen[c] = key
    for key in table:
        if key not in seen:
            raise CheckpointError(f"missing tensor {key}: expected in {where} of {reader.directory}")
    for key, fname in ckpt.items():
        if canon[key] not in table:
            raise CheckpointError(f"unexpected tensor {key} in {fname}: no mmjax parameter takes it "
                                  f"(wrong layout/config, or a model variant mmjax does not support)")
    for key, fname in ckpt.items():
        rule, layer = table[canon[key]]
        var = get_path(state, rule.path)
        mm_shape = tuple(var.shape) if layer is None else tuple(var.shape[1:])
        want = _hf_shape(rule, mm_shape)
        got = reader.info(key).shape
        if tuple(got) != want:
            raise CheckpointError(f"tensor {key} in {fname}: checkpoint shape {tuple(got)} != model "
                                  f"shape {want} (config.json does not match the weights)")


def _default_place(path, value: np.ndarray, sharding_fn):
    import jax
    if sharding_fn is not None:
        sharding = sharding_fn(path, value.shape, value.dtype)
        if sharding is not None:
            return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
    return jax.device_put(value)


def load_into(model, reader: ShardedReader, sharding_fn: Callable | None = None, layout: str = "causal_lm") -> None:
    """Fill ``model``'s (abstract) parameters from ``reader``, tensor by tensor."""
    from flax import nnx
    from mmjax.weights.rules import get_path

    table = layouts.weight_table(model)
    params = nnx.state(model, nnx.Param)
    to_table = layouts.key_canonicalizer(layout)
    canon = {k: to_table(k) for k in reader.weight_map}
    check_keys(reader, table, params, canon)

    filled: set[tuple[str, ...]] = set()
    buffers: dict[tuple[str, ...], tuple[np.ndarray, int]] = {}   # path -> (buffer, slices still missing)
    for fname, key in reader.keys_in_file_order():
        rule, layer = table[canon[key]]
        var = get_path(params, rule.path)
        dt = np.dtype(var.dtype)
        value = to_mmjax(rule, reader.get(key))
        if layer is None:
            var.set_value(_default_place(rule.path, value.astype(dt, copy=False), sharding_fn))
            filled.add(rule.path)
        else:
            if rule.path not in buffers:
                n = var.shape[0]
                buffers[rule.path] = (np.empty(var.shape, dt), n)
            buf, missing = buffers[rule.path]
            buf[layer] = value        # casts into the buffer dtype
            missing -= 1
            if missing == 0:
                var.set_value(_default_place(rule.path, buf, sharding_fn))
                del buffers[rule.path]
                filled.add(rule.path)
            else:
                buffers[rule.path] = (buf, missing)
        del value
    reader.close()
    if buffers:   # every layer key was checked present, so this means a num_layers_map mismatch
        path = next(iter(buffers))
        raise CheckpointError(f"parameter {'/'.join(map(str, path))}: {buffers[path][1]} layer slices not found "
                              f"in the checkpoint")
    unfilled = [p for p, _ in nnx.to_flat_state(params) if tuple(p) not in filled]
    if unfilled:
        raise CheckpointError(f"model parameter {'/'.join(map(str, unfilled[0]))} has no checkpoint tensor "
                              f"(weight_rules is missing a rule; {len(unfilled)} parameter(s) unfilled)")
    nnx.update(model, params)


def make_record(directory: str, layout: str, config_text: str, reader: ShardedReader) -> layouts.SourceRecord:
    entries = []
    for fname in reader.files:
        for key, info in reader.headers[fname].tensors.items():
            entries.append(layouts.TensorEntry(key, info.dtype, tuple(info.shape), fname))
    return layouts.SourceRecord(
        source_dir=os.path.abspath(directory), layout=layout, config_json=config_text, tensors=tuple(entries),
        sharded=reader.sharded,
        index_metadata_json=None if reader.index_metadata is None else json.dumps(reader.index_metadata),
        file_metadata=tuple((f, json.dumps(h.metadata)) for f, h in reader.headers.items()))


def from_pretrained(path, dtype: str = "float32", param_dtype: str | None = None, *, options=None,
                    sharding_fn: Callable | None = None, **config_overrides):
    """Load an HF checkpoint directory as an mmjax model.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``.
      param_dtype: parameter dtype; defaults to ``dtype``.
      options: a :class:`mmjax.models.options.ModelOptions` (remat, attention backend and block,
        ViT drop path, ``img_context_token_id`` for a directory with no tokenizer naming
        ``<IMG_CONTEXT>``); its fields may also be passed as keywords (``remat="full"``).
      sharding_fn: optional ``(param_path, shape, dtype) -> Sharding`` used to place each parameter.
      **config_overrides: other fields of the model config to replace.

    The ``<IMG_CONTEXT>`` id of the InternVL layouts comes from ``image_token_id`` in a transformers
    config, else from the directory's tokenizer files (added_tokens.json, tokenizer_config.json
    ``added_tokens_decoder``, tokenizer.json; parsed as JSON, no code run). If none names it the
    model's ``cfg.img_context_token_id`` stays None: text-only calls work, image inputs raise.

    Returns the model (an ``nnx.Module``) with a :class:`~mmjax.weights.layouts.SourceRecord` in its
    ``hf_source`` attribute. Raises :class:`CheckpointError` for bad input.
    """
    model_dtype(dtype)
    model_dtype(param_dtype, "param_dtype")
    path = check_directory(path)
    config, text = read_config(path)
    layout = layouts.detect_layout(config)
    reader = ShardedReader(path)
    from mmjax.models.options import ModelOptions
    options, config_overrides = ModelOptions.from_kwargs(options, config_overrides)
    model = layouts.build_abstract(layout, config, dtype=dtype, param_dtype=param_dtype or dtype,
                                   directory=path, options=options, **config_overrides)
    load_into(model, reader, sharding_fn=sharding_fn, layout=layout)
    layouts.attach_record(model, make_record(path, layout, text, reader))
    return model


__all__ = ["from_pretrained", "CheckpointError", "check_directory", "load_into", "make_record"]
