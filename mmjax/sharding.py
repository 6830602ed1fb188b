"""Mesh construction and the one table that maps logical axis names to mesh axes.

Every parameter records logical axis names (see ``mmjax.models.layers.param``); activations use
``batch`` / ``seq``. A 1-device mesh is the default, not a special case.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",   # fused / flattened query (and qkv) output features
    "kv": "tensor",      # flattened key/value output features
    "norm": None,
    "vit_embed": "fsdp",
    "vit_mlp": "tensor",
    "vit_heads": "tensor",
    "lora_rank": None,
    "tiles": ("data", "fsdp"),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    need = data * fsdp * tensor
    if need != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {need} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_spec(axes, shape=None, mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axes; a dimension that does not divide its mesh axes stays replicated."""
    out, used = [], set()
    for i, name in enumerate(axes or ()):
        rule = LOGICAL_RULES.get(name) if name is not None else None
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(n for n in names if n not in used)
        if mesh is not None and shape is not None and names:
            size = int(np.prod([mesh.shape[n] for n in names]))
            if shape[i] % size != 0:
                names = ()
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return P(*out)


def named_sharding(mesh: Mesh, axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
