"""Pixel shuffle (v1 / v2) and the ``mlp1`` vision -> LLM projector.

Pixel shuffle with ``ratio = 0.5`` turns a (h, w, C) ViT grid into (h/2, w/2, 4C): output cell (i, j)
holds ``concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1])`` (channel index
``(row_offset * 2 + col_offset) * C + c``). ``v2`` emits the cells row-major (i, j); ``v1`` (InternVL
1.2 checkpoints) emits them column-major (j, i), since its last transpose is missing upstream.
transformers' ``InternVLModel.pixel_shuffle`` equals ``v2``.

``mlp1`` = LayerNorm(eps 1e-5) -> Linear -> exact GELU -> Linear.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models.layers import Dense, LayerNorm, gelu_exact
from mmjax.weights.rules import TensorRule

PS_VERSIONS = ("v1", "v2")


def pixel_shuffle(x: jax.Array, ratio: float = 0.5, version: str = "v2") -> jax.Array:
    """(N, T, C) tokens of a square grid (or (N, h, w, C)) -> (N, T * ratio^2, C / ratio^2)."""
    if version not in PS_VERSIONS:
        raise ValueError(f"ps_version must be one of {PS_VERSIONS}, got {version!r}")
    if x.ndim == 3:
        n, t, c = x.shape
        side = int(round(t ** 0.5))
        if side * side != t:
            raise ValueError(f"{t} tokens do not form a square grid")
        x = x.reshape(n, side, side, c)
    n, h, w, c = x.shape
    f = int(round(1.0 / ratio))
    if abs(f * ratio - 1.0) > 1e-6:
        raise ValueError(f"downsample ratio {ratio} is not 1/integer")
    if h % f or w % f:
        raise ValueError(f"grid {(h, w)} is not divisible by {f}")
    x = x.reshape(n, h // f, f, w // f, f, c)
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    return x.transpose(order).reshape(n, (h // f) * (w // f), f * f * c)


class MLPProjector(nnx.Module):
    """``mlp1``: LayerNorm(in) -> Linear(in, out) -> GELU -> Linear(out, out)."""

    def __init__(self, in_features: int, out_features: int, *, eps: float = 1e-5, act: str = "gelu",
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if act != "gelu":
            raise ValueError(f"projector activation {act!r} is not supported (InternVL uses exact GELU)")
        self.dtype = dtype
        dense = functools.partial(Dense, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = LayerNorm(in_features, eps=eps, axis_name="vit_embed", param_dtype=param_dtype)
        self.linear_1 = dense(in_features, out_features, axes=("vit_embed", "mlp"))
        self.linear_2 = dense(out_features, out_features, axes=("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(gelu_exact(self.linear_1(self.layer_norm(x.astype(self.dtype)))))

    def weight_rules(self, layout: str = "internvl_chat") -> list[TensorRule]:
        return weight_rules(layout)


def weight_rules(layout: str = "internvl_chat") -> list[TensorRule]:
    """Keys relative to the projector module (``mlp1.`` / ``model.multi_modal_projector.`` not included)."""
    names = {"internvl_chat": ("0", "1", "3"), "hf": ("layer_norm", "linear_1", "linear_2")}
    if layout not in names:
        raise ValueError(f"unknown layout {layout!r}")
    ln, l1, l2 = names[layout]
    R = TensorRule
    return [R(f"{ln}.weight", ("layer_norm", "weight")), R(f"{ln}.bias", ("layer_norm", "bias")),
            R(f"{l1}.weight", ("linear_1", "kernel"), "linear"), R(f"{l1}.bias", ("linear_1", "bias")),
            R(f"{l2}.weight", ("linear_2", "kernel"), "linear"), R(f"{l2}.bias", ("linear_2", "bias"))]
