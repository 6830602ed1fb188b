"""Model parameters <-> an orbax checkpoint directory, with the HF source record beside them.

Directory written by :func:`save_params`::

    <ckpt_dir>/params/            orbax (StandardCheckpointer) of the parameters, a flat
                                  {"path.to.param": array} dict
    <ckpt_dir>/mmjax_source.json  {"format": 1, "param_dtype": ..., "record": <SourceRecord JSON>}
    <ckpt_dir>/hf_files/          tokenizer / generation / processor / *.py files of the source

The sidecar holds the original config.json text, layout, per-tensor dtypes and shard map, so
:func:`orbax_to_hf` writes back the same HF directory the model was loaded from.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from mmjax.weights import layouts
from mmjax.weights.safetensors_io import CheckpointError

SIDECAR = "mmjax_source.json"
PARAMS_DIR = "params"
AUX_DIR = "hf_files"
FORMAT = 1


def _flat_params(model):
    """``(state, {"path.to.param": Variable})``; the Variables belong to ``state``."""
    from flax import nnx
    state = nnx.state(model, nnx.Param)
    return state, {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def save_params(model, ckpt_dir, record: layouts.SourceRecord | None = None) -> str:
    """Write ``model``'s parameters and its source record (required) to ``ckpt_dir``."""
    import numpy as np
    import orbax.checkpoint as ocp

    record = record or layouts.source_record(model)
    if record is None:
        raise CheckpointError("model has no HF source record; load it with mmjax.from_pretrained or pass record=")
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    os.makedirs(ckpt_dir, exist_ok=True)
    _, flat = _flat_params(model)
    dtypes = {str(np.dtype(v.dtype)) for v in flat.values()}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(ckpt_dir, PARAMS_DIR), {k: v.get_value() for k, v in flat.items()}, force=True)
    aux_out = os.path.join(ckpt_dir, AUX_DIR)
    os.makedirs(aux_out, exist_ok=True)
    if record.source_dir and os.path.isdir(record.source_dir):
        for name in layouts.aux_files(record.source_dir):
            if os.path.realpath(os.path.join(record.source_dir, name)) != os.path.realpath(os.path.join(aux_out, name)):
                shutil.copyfile(os.path.join(record.source_dir, name), os.path.join(aux_out, name))
    side = {"format": FORMAT, "param_dtype": dtypes.pop() if len(dtypes) == 1 else None,
            "record": json.loads(record.replace(source_dir=AUX_DIR).to_json())}
    with open(os.path.join(ckpt_dir, SIDECAR), "w") as f:
        json.dump(side, f, indent=1)
    return ckpt_dir


def read_sidecar(ckpt_dir) -> tuple[layouts.SourceRecord, dict]:
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    path = os.path.join(ckpt_dir, SIDECAR)
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {SIDECAR} in {ckpt_dir} (not written by hf_to_mmjax / save_params)")
    with open(path) as f:
        side = json.load(f)
    if side.get("format") != FORMAT:
        raise CheckpointError(f"{SIDECAR}: unsupported format {side.get('format')!r} (expected {FORMAT})")
    record = layouts.SourceRecord.from_json(json.dumps(side["record"]))
    src = record.source_dir
    record = record.replace(source_dir=src if os.path.isabs(src) else os.path.join(ckpt_dir, src))
    return record, side


def load_params(ckpt_dir, dtype: str = "float32", param_dtype: str | None = None,
                sharding_fn: Callable | None = None, **config_overrides):
    """Rebuild the model from the sidecar and restore its parameters (each placed by ``sharding_fn``).

    ``param_dtype`` defaults to the dtype the parameters were saved in."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import nnx

    record, side = read_sidecar(ckpt_dir)
    saved = side.get("param_dtype")
    param_dtype = param_dtype or saved or dtype
    from mmjax.models.options import ModelOptions
    options, config_overrides = ModelOptions.from_kwargs(None, config_overrides)
    model = layouts.build_abstract(record.layout, record.config, dtype=dtype, param_dtype=param_dtype,
                                   directory=record.source_dir, options=options, **config_overrides)
    state, flat = _flat_params(model)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(key, var):
        sh = sharding_fn(tuple(key.split(".")), tuple(var.shape), np.dtype(var.dtype)) if sharding_fn else None
        return jax.ShapeDtypeStruct(tuple(var.shape), var.dtype, sharding=sh or default)

    abstract = {k: target(k, v) for k, v in flat.items()}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.join(os.path.abspath(os.fspath(ckpt_dir)), PARAMS_DIR), abstract)
    for k, var in flat.items():
        var.set_value(restored.pop(k))
    nnx.update(model, state)
    layouts.attach_record(model, record)
    return model


def hf_to_orbax(hf_dir, out_dir, dtype: str = "float32", param_dtype: str | None = None) -> str:
    """HF checkpoint directory -> orbax parameters + sidecar."""
    from mmjax.weights.loader import from_pretrained
    model = from_pretrained(hf_dir, dtype=dtype, param_dtype=param_dtype)
    return save_params(model, out_dir)


def orbax_to_hf(ckpt_dir, out_dir, dtype: str | None = None) -> str:
    """orbax parameters + sidecar -> HF checkpoint directory (the layout it was converted from)."""
    from mmjax.weights.saver import save_pretrained
    model = load_params(ckpt_dir)
    return save_pretrained(model, out_dir, dtype=dtype)


__all__ = ["save_params", "load_params", "read_sidecar", "hf_to_orbax", "orbax_to_hf", "SIDECAR"]
