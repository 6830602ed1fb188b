"""``from_pretrained``: an HF checkpoint directory -> an mmjax model, streamed tensor by tensor.

Steps: check the directory (config.json, safetensors files, headers against file sizes), detect the
layout, build the model abstractly (``nnx.eval_shape``: no parameter memory), check the key sets and
shapes from the headers alone, then build each parameter shard by shard: read the HF slice that
maps onto the shard (``rules.mmjax_axes``), transpose and cast it, place it. Host memory holds one
shard besides the placed weights, and a process reads only the slices its devices hold.

Placement: ``sharding_fn(path, shape, dtype) -> jax.sharding.Sharding | None`` when given, else the
``mesh`` sharding of the parameter's logical axes, else the default device.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from mmjax.dtypes import model_dtype
from mmjax.weights import layouts
from mmjax.weights.safetensors_io import INDEX_FILE, SINGLE_FILE, CheckpointError, ShardedReader, np_dtype


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

    ``canon`` maps each checkpoint key the model reads to its ``table`` key (identity except for
    spelling variants); the tensors a layout carries unread (:func:`layouts.carried_key`) are not in it."""
    from mmjax.weights.rules import get_path
    ckpt = {k: reader.weight_map[k] for k in canon}
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
        stored = reader.info(key).dtype
        if np.issubdtype(np.dtype(var.dtype), np.floating) and stored not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {key} in {fname}: stored as {stored}, but a weight is a float "
                                  f"({', '.join(FLOAT_DTYPES)}): the header's dtype is wrong, or the checkpoint is "
                                  "quantized (mmjax reads unquantized weights)")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")   # what a parameter may be stored as


_NONFINITE = {}


def _nonfinite_count(x, stacked: bool):
    """Non-finite values of a placed parameter: one count, or one per layer of a stacked one
    (dispatched, not fetched: the loader reads every count at once at the end)."""
    import jax
    import jax.numpy as jnp
    if stacked not in _NONFINITE:
        _NONFINITE[stacked] = jax.jit(lambda a: jnp.sum(~jnp.isfinite(a), axis=tuple(range(1, a.ndim))
                                                        if stacked else None))
    return _NONFINITE[stacked](x)


def _host_value(x) -> np.ndarray:
    """A small result array on the host, also when it spans several processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_finite(counts: list) -> None:
    """Name the first checkpoint tensor holding NaN / Inf (``counts``: (layer keys, count array))."""
    for keys, count in counts:
        per_layer = np.atleast_1d(_host_value(count))
        bad = np.flatnonzero(per_layer)
        if bad.size:
            layer = None if None in keys else int(bad[0])
            total = int(per_layer.sum())
            raise CheckpointError(f"tensor {keys[layer]} holds {int(per_layer[bad[0]])} NaN / Inf values"
                                  + (f" ({total} in {bad.size} layers of this parameter)" if bad.size > 1 else "")
                                  + ": the checkpoint is damaged, or was saved after a diverged step")


def _placement(path, var, sharding_fn, mesh):
    """Where parameter ``path`` goes: ``sharding_fn``'s answer, else the mesh sharding of the
    logical axes the parameter records, else the default device."""
    import jax
    from mmjax import sharding as shd
    if sharding_fn is not None:
        sharding = sharding_fn(path, tuple(var.shape), np.dtype(var.dtype))
        if sharding is not None:
            return sharding
    if mesh is not None:
        return shd.named_sharding(mesh, var.get_metadata().get("out_sharding"), tuple(var.shape))
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _host_copy(src: np.ndarray) -> np.ndarray:
    """A contiguous copy of a (mapped, maybe strided) array, copied as unsigned integers of the same
    width: numpy copies ml_dtypes' bfloat16 element by element, ~2x slower than raw 2-byte words."""
    out = np.empty(src.shape, src.dtype)
    if src.dtype.itemsize in (1, 2, 4, 8) and src.dtype.kind not in "biu":
        raw = np.dtype(f"u{src.dtype.itemsize}")
        out.view(raw)[...] = src.view(raw)
    else:
        out[...] = src
    return out


def _read_hf(reader: ShardedReader, key: str, hf_index: tuple) -> np.ndarray:
    """``tensor[hf_index]`` of a checkpoint tensor as a fresh host array in its HF layout: whole rows
    are read from the file with one ``readinto`` (a mapped read costs more in page faults than in
    copying), anything else (a slice across a later axis) is copied out of the mapped tensor."""
    info = reader.info(key)
    if not info.shape:
        return _host_copy(reader.view(key))
    if all((sl.start, sl.stop) == (0, n) for sl, n in zip(hf_index[1:], info.shape[1:])):
        first, stop = hf_index[0].start, hf_index[0].stop
        return reader.read_rows(key, first, np.empty((stop - first,) + tuple(info.shape[1:]), np_dtype(info.dtype)))
    return _host_copy(reader.view(key)[hf_index])


XLA_TRANSPOSE_ELEMENTS = 1 << 18   # larger tensors are transposed by XLA on the host CPU
_XLA_CONVERT = None


def _to_mmjax_layout(x: np.ndarray, perm: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``x.transpose(perm).astype(dtype)`` as a contiguous host array. A large transpose runs
    through XLA on the CPU device: numpy's strided copy of a bf16 kernel runs at ~0.2-0.3 GB/s
    here, XLA's blocked transpose at ~1.3 GB/s (measured)."""
    global _XLA_CONVERT
    if perm == tuple(range(x.ndim)):
        return x.astype(dtype, copy=False)
    if x.size < XLA_TRANSPOSE_ELEMENTS:
        return np.ascontiguousarray(x.transpose(perm)).astype(dtype, copy=False)
    import jax
    import jax.numpy as jnp
    if _XLA_CONVERT is None:
        _XLA_CONVERT = jax.jit(lambda t, perm, dt: jnp.transpose(t, perm).astype(dt), static_argnums=(1, 2))
    cpu = jax.devices("cpu")[0]
    return np.asarray(_XLA_CONVERT(jax.device_put(x, cpu), perm, np.dtype(dtype).name))


def _bounded(index, shape) -> tuple[slice, ...]:
    """A shard index as one ``slice(start, stop)`` per axis (missing axes and open bounds filled)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    return tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))


def _shard_reader(reader: ShardedReader, rule, keys: dict, shape: tuple[int, ...], dtype: np.dtype):
    """``index -> ndarray``: the part ``index`` (a tuple of slices) of the parameter in the mmjax
    layout and ``dtype``, read from the checkpoint tensor(s): only the HF slice that maps onto it,
    one layer at a time for a stacked parameter (layer ``l`` from ``keys[l]``)."""
    from mmjax.weights.rules import mmjax_axes
    stacked = None not in keys

    def read(index):
        index = _bounded(index, shape)
        rest = index[1:] if stacked else index
        perm = mmjax_axes(rule, len(rest))
        hf_index = [None] * len(rest)
        for i, sl in enumerate(rest):             # mmjax axis i is HF axis perm[i]
            hf_index[perm[i]] = sl
        hf_index = tuple(hf_index)
        if not stacked:
            return _to_mmjax_layout(_read_hf(reader, keys[None], hf_index), perm, dtype)
        out = np.empty(tuple(sl.stop - sl.start for sl in index), dtype)
        for j, layer in enumerate(range(index[0].start, index[0].stop)):
            out[j] = _to_mmjax_layout(_read_hf(reader, keys[layer], hf_index), perm, dtype)
        return out

    return read


def _build(reader: ShardedReader, rule, keys: dict, shape, dtype, sharding):
    """The parameter as a global array in ``sharding``: each distinct shard of this process's
    devices is read once (then copied to the other devices that hold the same part)."""
    import jax
    read = _shard_reader(reader, rule, keys, shape, dtype)
    done: dict[tuple, object] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = _bounded(index, shape)
        key = tuple((sl.start, sl.stop) for sl in index)
        if key not in done:
            done[key] = jax.device_put(read(index), device)
            arrays.append(done[key])
        else:
            arrays.append(jax.device_put(done[key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_into(model, reader: ShardedReader, sharding_fn: Callable | None = None, layout: str = "causal_lm",
              mesh=None) -> None:
    """Fill ``model``'s (abstract) parameters from ``reader``, each placed straight into its sharding.

    Every parameter is built shard by shard for the devices of this process (:func:`_build`): each
    shard reads just its slice of the safetensors file(s) (a stacked parameter from its per-layer
    tensors), transposed and cast on the way; host memory holds one shard at a time besides the
    placed weights, and on several processes each reads only its devices' slices. Every floating
    parameter is scanned for NaN / Inf on its devices as it lands (one fetch of the counts at the
    end), and a weight stored in an integer dtype is refused from the header."""
    from flax import nnx

    table = layouts.weight_table(model)
    params = nnx.state(model, nnx.Param)
    to_table = layouts.key_canonicalizer(layout)
    canon = {k: to_table(k) for k in reader.weight_map if not layouts.carried_key(layout, k)}
    check_keys(reader, table, params, canon)

    sources: dict[tuple, tuple] = {}   # param path -> (rule, {layer index or None: checkpoint key})
    counts = []                        # (layer keys, non-finite count): the start-up scan
    for key in canon:
        rule, layer = table[canon[key]]
        sources.setdefault(tuple(rule.path), (rule, {}))[1][layer] = key
    for path, var in nnx.to_flat_state(params):
        path = tuple(path)
        if path not in sources:
            raise CheckpointError(f"model parameter {'/'.join(map(str, path))} has no checkpoint tensor "
                                  f"(weight_rules is missing a rule)")
        rule, keys = sources[path]
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        if None not in keys and len(keys) != shape[0]:   # every layer key was checked present: a depth mismatch
            raise CheckpointError(f"parameter {'/'.join(map(str, path))}: {shape[0] - len(keys)} layer slices not "
                                  f"found in the checkpoint")
        value = _build(reader, rule, keys, shape, dtype, _placement(path, var, sharding_fn, mesh))
        if np.issubdtype(dtype, np.floating):
            counts.append((keys, _nonfinite_count(value, None not in keys)))
        var.set_value(value)
    reader.close()
    _check_finite(counts)
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
                    mesh=None, sharding_fn: Callable | None = None, **config_overrides):
    """Load an HF checkpoint directory as an mmjax model.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``.
      param_dtype: parameter dtype; defaults to ``dtype``.
      options: a :class:`mmjax.models.options.ModelOptions` (remat, attention backend and block,
        ViT drop path, ``img_context_token_id`` for a directory with no tokenizer naming
        ``<IMG_CONTEXT>``); its fields may also be passed as keywords (``remat="full"``).
      mesh: a ``jax.sharding.Mesh``: each parameter is placed straight into the sharding its logical
        axes map to (:mod:`mmjax.sharding`); without one, on the default device.
      sharding_fn: optional ``(param_path, shape, dtype) -> Sharding | None`` deciding a parameter's
        placement before the mesh rule does (None: fall back to it).
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
    load_into(model, reader, sharding_fn=sharding_fn, layout=layout, mesh=mesh)
    layouts.attach_record(model, make_record(path, layout, text, reader))
    return model


__all__ = ["from_pretrained", "CheckpointError", "check_directory", "load_into", "make_record"]
