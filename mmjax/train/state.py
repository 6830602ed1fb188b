"""The train state: which parameters train, where they live on the mesh, and what is carried
from step to step.

The model is split once into ``graphdef`` (static structure), ``trainable`` params, ``frozen``
params and the rest. Only ``trainable`` enters ``jax.grad`` and the optimizer, so frozen
parameters have no gradients and no optimizer state. LoRA adapters (``nnx.LoRAParam``) are
always trainable.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax import sharding as shd


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def effective_freeze(cfg):
    """The freeze flags after LoRA: as in peft, a module that carries adapters trains only its
    adapters, so a LoRA rank on the LLM (ViT) freezes the LLM (ViT) base weights. As upstream,
    ``unfreeze_vit_layers`` still trains the base weights of ViT layers ``[k:]`` next to the ViT
    adapters (upstream wraps the backbone with LoRA, then re-enables those layers' weights)."""
    import ml_collections
    f = cfg.freeze.to_dict() if hasattr(cfg.freeze, "to_dict") else dict(cfg.freeze)
    if cfg.lora.llm_rank:
        f["llm"] = True
    if cfg.lora.vit_rank:
        f["backbone"] = True
    return ml_collections.ConfigDict(f)


def trainable_filter(freeze, has_vision: bool) -> Callable[[tuple, Any], bool]:
    """The parameters that train under the config's ``freeze`` block (upstream semantics:
    freeze_backbone / freeze_mlp / freeze_llm; ``unfreeze_vit_layers`` = k re-enables the ViT
    layers ``[k:]`` as upstream slices them (negative k = the last |k|), handled by :func:`vit_layer_mask` because ViT layers are one stacked array)."""

    def f(path, value) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        if isinstance(value, nnx.LoRAParam):
            return True
        head = str(path[0]) if has_vision else "language_model"
        if head == "vision_model":
            if freeze.get("unfreeze_vit_layers", 0) and len(path) > 1 and str(path[1]) == "layers":
                return True
            return not freeze.backbone
        if head == "mlp1":
            return not freeze.mlp
        return not freeze.llm

    return f


def vit_layer_mask(trainable: nnx.State, freeze, has_vision: bool, layers_read: int | None = None):
    """Per-leaf multiplier (or None) on the updates of the stacked ViT layers, for the layers that
    do not train in this configuration although their stacked array does:

    * base weights of layers a frozen backbone keeps when only ``[unfreeze_vit_layers:]`` train;
    * every leaf (LoRA factors too) of the layers after ``select_layer`` (the first ``layers_read``
      layers are all the features depend on): they never receive a gradient, so, as PyTorch's
      AdamW skips a parameter without a gradient, they get neither weight decay nor an update.

    The masked layers keep (zero) optimizer state: the price of scanning the ViT as one stack.
    LoRA adapters of the layers that run are never masked."""
    k = int(freeze.get("unfreeze_vit_layers", 0) or 0)
    partial_backbone = bool(has_vision and freeze.backbone and k)
    if not has_vision or (not partial_backbone and layers_read is None):
        return None

    def m(path, x):
        keys = [str(p.key) for p in path if hasattr(p, "key")]   # dict keys (the Variable's .value dropped)
        if not (len(keys) > 2 and keys[0] == "vision_model" and keys[1] == "layers"):
            return None
        n = x.shape[0]
        idx = np.arange(n)
        keep = idx < (n if layers_read is None else layers_read)
        if partial_backbone and keys[-1] not in LORA_LEAVES:
            # upstream slices encoder.layers[k:]: k = -2 trains the last two, k = 20 layers 20..
            first = max(0, min(n, k if k >= 0 else n + k))
            keep &= idx >= first
        if keep.all():
            return None
        return jnp.asarray(keep.astype(np.float32)).reshape((n,) + (1,) * (x.ndim - 1))

    mask = jax.tree_util.tree_map_with_path(m, trainable)
    return mask if jax.tree.leaves(mask) else None   # None leaves are empty subtrees


# names of LoRA factor leaves (mmjax.models.lora): trainable wherever they are
LORA_LEAVES = ("lora_a", "lora_b")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any            # nnx.State of trainable parameters (float32 master weights)
    opt_state: Any
    rng: jax.Array
    nonfinite_streak: jax.Array   # consecutive skipped updates
    nonfinite_total: jax.Array


def param_shardings(state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx.State from the logical axes each Param records."""

    def f(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding")
            return x.replace(shd.named_sharding(mesh, axes, x.shape))
        return NamedSharding(mesh, P())

    return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_leaves(state) -> list[tuple[str, Any, tuple, Any]]:
    """``(name, logical axes, shape, dtype)`` of every parameter of an nnx.State (for the mesh checks)."""
    out = []
    for path, x in nnx.to_flat_state(state):
        if isinstance(x, nnx.Variable):
            out.append(("/".join(map(str, path)), x.get_metadata().get("out_sharding"), tuple(x.shape), x.dtype))
    return out


def replicated(mesh: Mesh):
    return NamedSharding(mesh, P())


def count_params(state) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def state_bytes(state) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
