"""Mesh construction and the one table that maps logical axis names to mesh axes.

Every parameter records logical axis names (see ``mmjax.models.layers.param``); the models mark
their activations with :func:`constrain` and logical names too (rows, tokens, heads, tiles). One
table (:data:`LOGICAL_RULES`, overridable from ``config.mesh.rules``) maps both to the mesh axes
``data``, ``fsdp``, ``tensor``. A 1-device mesh is the default, not a special case: constraints are
applied only on a mesh of several devices, so the 1-device program is unchanged.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
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
    # activations
    "batch": ("data", "fsdp"),        # packed rows (the batch's leading axis)
    "seq": None,                      # tokens of a row
    "act_embed": None,                # hidden features (decoder and ViT)
    "act_heads": "tensor",            # attention heads of q (and of the ViT)
    "act_kv_heads": "tensor",         # key / value heads
    "act_mlp": "tensor",              # MLP intermediate features
    "act_vocab": "tensor",            # logits of a cross-entropy chunk
    "loss_tokens": ("data", "fsdp"),  # the tokens of a cross-entropy chunk
    "tiles": ("data", "fsdp"),        # image tiles into the ViT
    "vit_tokens": None,               # patch tokens of a tile
}


def rules_from_config(overrides) -> dict:
    """The rule table with ``config.mesh.rules`` applied: each value a comma-separated list of mesh
    axes (``"data,fsdp"``; ``""`` replicates). ValueError (one line) on an unknown name or axis."""
    rules = dict(LOGICAL_RULES)
    for name, value in dict(overrides or {}).items():
        if name not in LOGICAL_RULES:
            raise ValueError(f"config.mesh.rules.{name}: unknown logical axis; known: {sorted(LOGICAL_RULES)}")
        if value is None or isinstance(value, str):
            axes = tuple(a.strip() for a in (value or "").split(",") if a.strip() and a.strip() != "none")
        else:
            axes = tuple(value)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad or len(set(axes)) != len(axes):
            raise ValueError(f"config.mesh.rules.{name}={value!r}: mesh axes must be distinct names of "
                             f"{MESH_AXES} (comma-separated, '' to replicate)")
        rules[name] = axes[0] if len(axes) == 1 else (axes or None)
    return rules


def rules_as_config() -> dict:
    """:data:`LOGICAL_RULES` spelled as ``config.mesh.rules`` takes it (every value a string)."""
    spell = lambda r: "" if r is None else r if isinstance(r, str) else ",".join(r)
    return {name: spell(rule) for name, rule in LOGICAL_RULES.items()}


# the rules (and the mesh whose activations get constraints) that are in force; see use_rules
_in_force: list[tuple[dict, Mesh | None]] = [(LOGICAL_RULES, None)]
_warned: set = set()


@contextlib.contextmanager
def use_rules(rules: dict, mesh: Mesh | None = None):
    """Within: parameter placement reads ``rules``, and :func:`constrain` places activations on
    ``mesh`` (when it has several devices). Tracing a step inside makes its constraints."""
    _in_force.append((rules, mesh))
    try:
        yield
    finally:
        _in_force.pop()


def traced_with(fn, rules: dict, mesh: Mesh):
    """``fn`` whose body runs under :func:`use_rules` (so a jitted step traces its constraints)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with use_rules(rules, mesh):
            return fn(*args, **kwargs)
    return wrapped


def current_rules() -> dict:
    return _in_force[-1][0]


def mesh_in_force() -> Mesh | None:
    """The mesh :func:`constrain` places activations on (None outside :func:`use_rules`)."""
    return _in_force[-1][1]


def constrain(x: jax.Array, axes) -> jax.Array:
    """``x`` constrained to the sharding of its logical ``axes`` on the mesh in force; unchanged on
    one device or outside :func:`use_rules`. A dimension that does not divide its mesh axes stays
    replicated with a warning naming it (once)."""
    rules, mesh = _in_force[-1]
    if mesh is None or mesh.size == 1:
        return x
    unsharded: list = []
    spec = logical_to_spec(axes, x.shape, mesh, unsharded, rules)
    for dim, name, size, ways in unsharded:
        key = (tuple(axes), dim, size, ways)
        if key not in _warned:
            _warned.add(key)
            logging.warning("activation %s: dim %d (%s) = %d does not divide mesh ways %d; kept replicated",
                            tuple(axes), dim, name, size, ways)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    need = data * fsdp * tensor
    if need != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {need} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(data, fsdp, tensor), MESH_AXES)


def logical_to_spec(axes, shape=None, mesh: Mesh | None = None, unsharded: list | None = None,
                    rules: dict | None = None) -> P:
    """PartitionSpec for logical axes under ``rules`` (default: those in force). A dimension whose size does not divide its mesh axes stays
    replicated; when ``unsharded`` is a list, ``(dim, logical name, size, mesh ways)`` is appended to
    it for every such dimension whose mesh axes are larger than 1 (so the caller can name it)."""
    rules = current_rules() if rules is None else rules
    out, used = [], set()
    for i, name in enumerate(axes or ()):
        rule = rules.get(name) if name is not None else None
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


class ShardingError(UserError, ValueError):
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
            + "; ".join(describe(o) for o in offenders[:3]) + ". Choose mesh sizes that divide these dimensions, "
            f"or replicate them on purpose (e.g. --config.mesh.rules.{offenders[0][3][0][1]}='')")
    return [f"replicated on mesh {dict(mesh.shape)} (dimension does not divide): {describe(o)}" for o in offenders]
