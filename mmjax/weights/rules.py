"""The HF <-> mmjax tensor correspondence: one rule per HF tensor name.

A model family lists its rules next to its module (``weight_rules``); loading and saving walk the
same list, so the two directions cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

TRANSFORMS = ("linear", "conv", "none")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_key: str                 # may contain '{i}' = layer index of a stacked parameter
    path: tuple[str, ...]       # path of the nnx.Param in nnx.state(model)
    transform: str = "none"     # linear: (out,in)<->(in,out); conv: OIHW<->HWIO; none: copy

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r} for {self.hf_key}")

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key

    def with_prefix(self, key_prefix: str = "", path_prefix: tuple[str, ...] = ()) -> "TensorRule":
        return dataclasses.replace(self, hf_key=key_prefix + self.hf_key, path=tuple(path_prefix) + self.path)


# (HF -> mmjax, mmjax -> HF) axis orders per transform (None: reversed, i.e. ``.T``): linear
# kernels are HF (out, in) vs mmjax (in, out); convs are OIHW in HF, HWIO in mmjax
_PERMUTATIONS = {"linear": (None, None), "conv": ((2, 3, 1, 0), (3, 2, 0, 1))}


def to_mmjax(rule: TensorRule, hf_tensor: np.ndarray) -> np.ndarray:
    if rule.transform not in _PERMUTATIONS:
        return hf_tensor
    return np.ascontiguousarray(hf_tensor.transpose(_PERMUTATIONS[rule.transform][0]))


def mmjax_axes(rule: TensorRule, ndim: int) -> tuple[int, ...]:
    """The permutation ``p`` with ``to_mmjax(rule, t) == t.transpose(p)`` for an ``ndim``-D tensor."""
    if rule.transform not in _PERMUTATIONS:
        return tuple(range(ndim))
    perm = _PERMUTATIONS[rule.transform][0]
    return tuple(reversed(range(ndim))) if perm is None else tuple(perm)


def to_hf(rule: TensorRule, mm_tensor: np.ndarray) -> np.ndarray:
    if rule.transform not in _PERMUTATIONS:
        return mm_tensor
    return np.ascontiguousarray(mm_tensor.transpose(_PERMUTATIONS[rule.transform][1]))


def expand(rules: Iterable[TensorRule], num_layers: dict[tuple[str, ...], int] | int) -> list[tuple[str, TensorRule, int | None]]:
    """Concrete ``(hf_key, rule, layer_index)`` triples. ``num_layers`` is an int, or a map from a
    path prefix to the depth of the stack living under it (the ViT and the decoder differ)."""
    out = []
    for rule in rules:
        if not rule.stacked:
            out.append((rule.hf_key, rule, None))
            continue
        if isinstance(num_layers, int):
            n = num_layers
        else:
            matches = [(len(p), v) for p, v in num_layers.items() if rule.path[:len(p)] == p]
            if not matches:
                raise KeyError(f"no layer count for stacked rule {rule.hf_key} at {rule.path}")
            n = max(matches)[1]
        out.extend((rule.hf_key.format(i=i), rule, i) for i in range(n))
    return out


def key_pattern(rule: TensorRule) -> re.Pattern:
    """A regex that matches the concrete keys of ``rule`` (used to explain unexpected keys)."""
    return re.compile(re.escape(rule.hf_key).replace(re.escape("{i}"), r"(\d+)") + "$")


def get_path(state, path: tuple[str, ...]):
    node = state
    for p in path:
        node = node[p]
    return node


def assign(model, rules: Iterable[TensorRule], tensors: dict[str, np.ndarray],
           num_layers: dict[tuple[str, ...], int] | int) -> None:
    """Fill ``model``'s parameters from an in-memory HF state dict (tests, small models).

    The streaming loader in ``mmjax.weights.loader`` is the path for real checkpoints; this is the
    same rule walk without file IO. Missing keys raise; extra keys in ``tensors`` raise.
    """
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    used = set()
    stacked_buffers: dict[tuple[str, ...], np.ndarray] = {}
    for key, rule, layer in expand(rules, num_layers):
        if key not in tensors:
            raise KeyError(f"missing tensor {key}")
        used.add(key)
        var = get_path(state, rule.path)
        value = to_mmjax(rule, np.asarray(tensors[key]))
        target = var.shape if layer is None else var.shape[1:]
        if tuple(value.shape) != tuple(target):
            raise ValueError(f"tensor {key}: checkpoint shape {tuple(value.shape)} after {rule.transform} "
                             f"!= model shape {tuple(target)}")
        if layer is None:
            var.set_value(jnp.asarray(value, var.dtype))
        else:
            buf = stacked_buffers.setdefault(rule.path, np.zeros(var.shape, value.dtype))
            buf[layer] = value
    for path, buf in stacked_buffers.items():
        var = get_path(state, path)
        var.set_value(jnp.asarray(buf, var.dtype))
    extra = sorted(set(tensors) - used)
    if extra:
        raise KeyError(f"unexpected tensor {extra[0]} (and {len(extra) - 1} more)")
    nnx.update(model, state)


def module_names(model) -> list[str]:
    """Concrete HF names of the model's weight-carrying modules (``...layers.3.attention.wqkv``),
    the names peft adapters address."""
    return [key[:-len(".weight")] for key, _, _ in expand(model.weight_rules(), model.num_layers_map())
            if key.endswith(".weight")]
