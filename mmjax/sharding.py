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


def logical_to_spec(axes, shape=None, mesh: Mesh | None = None, unsharded: list | None = None) -> P:
    """PartitionSpec for logical axes. A dimension whose size does not divide its mesh axes stays
    replicated; when ``unsharded`` is a list, ``(dim, logical name, size, mesh ways)`` is appended to
    it for every such dimension whose mesh axes are larger than 1 (so the caller can name it)."""
    out, used = [], set()
    for i, name in enumerate(axes or ()):
        rule = LOGICAL_RULES.get(name) if name is not None else None
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(n for n in names if n not in used)
        if mesh is not None and shape is not None and names:
            size = int(np.prod([mesh.shape[n] for n in names]))
            if shape[i] % size != 0:
                if unsharded is not None and size > 1:
                    unsharded.append((i, name, int(shape[i]), size))
                names = ()
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return P(*out)


def named_sharding(mesh: Mesh, axes, shape=None, unsharded: list | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, unsharded))


class ShardingError(ValueError):
    """The parameters would be replicated where the mesh was meant to split them (one-line message)."""


REPLICATION_LIMIT = 0.02   # share of parameter bytes that may stay replicated against the rules


def check_replication(leaves, mesh: Mesh, limit: float = REPLICATION_LIMIT) -> list[str]:
    """Parameters the mesh rules meant to split but cannot (a dimension does not divide its mesh
    axes). What counts is the memory each device holds beyond the plan, ``bytes x (1 / ways split -
    1 / ways meant)``: an error naming the largest when it exceeds ``limit`` of the parameter bytes,
    else one warning line per parameter (returned). ``leaves``: ``(name, logical axes, shape,
    dtype)``. Replication the rules ask for (norms, the layer axis, mesh axes of size 1) is planned."""
    total, offenders, excess = 0, [], 0.0
    for name, axes, shape, dtype in leaves:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        total += nbytes
        unsharded: list = []
        spec = logical_to_spec(axes, shape, mesh, unsharded)
        if not unsharded:
            continue
        split = int(np.prod([mesh.shape[a] for part in spec if part
                             for a in ((part,) if isinstance(part, str) else part)]))
        meant = split * int(np.prod([ways for *_, ways in unsharded]))
        extra = nbytes * (1 / split - 1 / meant)
        excess += extra
        offenders.append((extra, nbytes, name, unsharded))
    offenders.sort(key=lambda o: -o[0])

    def describe(o):
        extra, nbytes, name, dims = o
        why = ", ".join(f"dim {i} ({ax}) = {n} not divisible by {ways}" for i, ax, n, ways in dims)
        return f"{name} ({nbytes / 2 ** 20:.1f} MiB, {extra / 2 ** 20:.1f} MiB more per device): {why}"

    share = excess / max(total, 1)
    if share > limit:
        raise ShardingError(
            f"mesh {dict(mesh.shape)} cannot split parameters its rules split: each device would hold "
            f"{share:.1%} of the parameter bytes more than planned (limit {limit:.0%}); largest: "
            + "; ".join(describe(o) for o in offenders[:3]) + ". Choose mesh sizes that divide these dimensions")
    return [f"replicated on mesh {dict(mesh.shape)} (dimension does not divide): {describe(o)}" for o in offenders]
