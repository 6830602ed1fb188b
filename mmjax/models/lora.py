"""LoRA adapters on the :class:`~mmjax.models.layers.Dense` layers of a CausalLM or an InternVL model.

Semantics follow upstream InternVL (``wrap_llm_lora`` / ``wrap_backbone_lora``, peft ``LoraConfig``):

* a targeted Dense gets ``lora_a`` (in, r), Kaiming-uniform(a=sqrt(5)) like peft's ``lora_A``
  (uniform in +-1/sqrt(in)), and ``lora_b`` (r, out) zeros, both ``nnx.LoRAParam`` (the trainer
  trains every LoRAParam), with a leading ``layers`` axis inside stacked layers;
* ``y = x @ W (+ bias) + (alpha / r) * dropout(x) @ lora_a @ lora_b``; upstream uses
  ``alpha = 2 r`` and dropout 0.05;
* LoRA on a fused module (InternLM2 ``wqkv``, Phi-3 ``qkv_proj`` / ``gate_up_proj``, InternViT
  ``attn.qkv``) is one A and one B over the fused output, as upstream.

Targets are given in mmjax names (``qkv_proj``, ``attn.o_proj``) or in the checkpoint's / peft's
names (``wqkv``, ``attention.wqkv``, ``self_attn.q_proj``); a name selects every linear module
whose mmjax path or HF module name equals it or ends with ``.<name>`` (peft's rule). The HF names
come from the model's own ``weight_rules``, so the same resolution serves every family and both
InternVL layouts, and :mod:`mmjax.weights.peft_io` derives peft's tensor keys from it.

LoRA dropout needs an explicit key: :func:`set_lora_dropout_key` writes one per adapted layer
(``None`` switches dropout off, the state after :func:`apply_lora`). Call it on the model that
runs the training forward, e.g. right after ``nnx.merge`` inside the loss function.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax.models.layers import Dense, DropoutState, dropout_state, logical_axes

# Upstream target lists (peft spelling) per decoder family (internvl.md 3.4).
LLM_TARGETS: dict[str, tuple[str, ...]] = {
    "internlm2": ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
LLM_TARGETS["qwen3"] = LLM_TARGETS["llama"] = LLM_TARGETS["qwen2"]
VIT_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

LORA_ATTRS = ("lora_a", "lora_b", "lora_rank", "lora_alpha", "lora_scaling", "lora_dropout",
              "lora_dropout_key", "lora_dropout_on")


LoRADropoutState = DropoutState   # per-layer LoRA dropout key / on-flag (mmjax.models.layers)


@dataclasses.dataclass(frozen=True)
class LinearModule:
    """A Dense of the model that LoRA can adapt."""

    path: tuple[str, ...]     # module path in the model, e.g. ('language_model', 'layers', 'attn', 'qkv_proj')
    hf_name: str              # full HF module name, '{i}' = layer, e.g. 'language_model.model.layers.{i}.attention.wqkv'
    group: str                # 'llm' | 'vit'
    local_path: tuple[str, ...]   # path inside the group's root module
    local_hf_name: str        # HF module name inside the group's root module (no layout prefix)
    num_layers: int | None    # stack depth (None = not stacked)

    def hf_names(self) -> list[str]:
        """Concrete HF module names (one per layer of a stacked module)."""
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(i=i) for i in range(self.num_layers)]


# --------------------------------------------------------------------------------------------
# Module discovery
# --------------------------------------------------------------------------------------------


def _groups(model) -> list[tuple[str, tuple[str, ...], object]]:
    """(group, path prefix, root module) of the parts LoRA may adapt."""
    if hasattr(model, "language_model") and hasattr(model, "vision_model"):
        return [("llm", ("language_model",), model.language_model), ("vit", ("vision_model",), model.vision_model)]
    if hasattr(model, "layers") and hasattr(model, "cfg") and hasattr(model.cfg, "family"):
        return [("llm", (), model)]
    raise TypeError(f"LoRA needs a CausalLM or an InternVL model, got {type(model).__name__}")


def _get_module(model, path: Sequence[str]):
    node = model
    for p in path:
        node = getattr(node, p)
    return node


def _strip_suffix(key: str, suffix: str) -> str:
    assert key.endswith(suffix), key
    return key[:-len(suffix)]


def linear_modules(model) -> list[LinearModule]:
    """Every Dense of the LLM / ViT with a linear weight rule, with its HF module name."""
    full_rules = {tuple(r.path): r for r in model.weight_rules()}
    layer_map = model.num_layers_map()
    out = []
    for group, prefix, root in _groups(model):
        # the ViT's rules in the layout its config stores (internvit.own_layout)
        local_rules = {tuple(r.path): r for r in root.weight_rules()}
        for path, module in nnx.iter_modules(root):
            if not isinstance(module, Dense):
                continue
            path = tuple(str(p) for p in path)
            local = local_rules.get(path + ("kernel",))
            full = full_rules.get(prefix + path + ("kernel",))
            if local is None or full is None or local.transform != "linear":
                continue
            n = None
            if full.stacked:
                n = max((len(p), v) for p, v in layer_map.items() if (prefix + path)[:len(p)] == p)[1]
            out.append(LinearModule(path=prefix + path, hf_name=_strip_suffix(full.hf_key, ".weight"), group=group,
                                    local_path=path, local_hf_name=_strip_suffix(local.hf_key, ".weight"),
                                    num_layers=n))
    return out


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _layer_matches(m: LinearModule, target: str) -> tuple[int, int]:
    """(layers matched, layers total) for one target name against a module."""
    local_names = ([m.local_hf_name] if m.num_layers is None
                   else [m.local_hf_name.format(i=i) for i in range(m.num_layers)])
    hits = sum(_matches(a, target) or _matches(b, target) for a, b in zip(local_names, m.hf_names()))
    mm_names = (".".join(m.local_path), ".".join(p for p in m.local_path if p != "layers"), ".".join(m.path))
    if any(_matches(n, target) for n in mm_names):
        hits = len(local_names)
    return hits, len(local_names)


def _display(m: LinearModule) -> str:
    mm = ".".join(p for p in m.local_path if p != "layers")
    return f"{mm} ({m.local_hf_name.replace('{i}', '*')})"


def resolve_targets(model, targets: Iterable[str], group: str) -> list[LinearModule]:
    """The linear modules of ``group`` ('llm' | 'vit') selected by ``targets`` (mmjax or HF names)."""
    mods = [m for m in linear_modules(model) if m.group == group]
    chosen: dict[tuple[str, ...], LinearModule] = {}
    for t in targets:
        t = str(t).strip()
        hit = []
        for m in mods:
            k, n = _layer_matches(m, t)
            if k and k != n:
                raise NotImplementedError(f"LoRA target {t!r} selects {k} of the {n} layers of {m.local_hf_name}; "
                                          f"adapters on a subset of stacked layers are not supported")
            if k:
                hit.append(m)
        if not hit and group == "vit" and t in ("qkv", "attn.qkv", "attention.qkv"):
            # transformers' InternVL vision tower keeps q/k/v separate: 'qkv' means all three
            hit = [m for m in mods if m.local_path[-1] in ("q_proj", "k_proj", "v_proj")]
        if not hit:
            avail = ", ".join(sorted({_display(m) for m in mods}))
            raise ValueError(f"LoRA target {t!r} matches no linear module of the {group.upper()}; available: {avail}")
        for m in hit:
            chosen[m.path] = m
    return [m for m in mods if m.path in chosen]


def default_llm_targets(model) -> tuple[str, ...]:
    family = _groups(model)[0][2].cfg.family
    if family not in LLM_TARGETS:
        raise ValueError(f"no default LoRA targets for decoder family {family!r}; pass llm_targets")
    return LLM_TARGETS[family]


# --------------------------------------------------------------------------------------------
# Adding, merging, counting
# --------------------------------------------------------------------------------------------


def lora_modules(model) -> list[tuple[tuple[str, ...], Dense]]:
    """(path, Dense) of every Dense that carries LoRA."""
    return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if isinstance(m, Dense) and getattr(m, "lora_a", None) is not None]


def _as_rngs(rngs) -> nnx.Rngs:
    if isinstance(rngs, nnx.Rngs):
        return rngs
    if rngs is None:
        rngs = 0
    return nnx.Rngs(params=rngs)


def add_lora(dense: Dense, *, rank: int, alpha: float, dropout: float = 0.0, key: jax.Array | None = None,
             scaling: float | None = None) -> None:
    """Give one Dense (stacked or not) LoRA factors: ``lora_a`` Kaiming-uniform (zeros if ``key`` is
    None), ``lora_b`` zeros. ``scaling`` defaults to ``alpha / rank``."""
    if getattr(dense, "lora_a", None) is not None:
        raise ValueError("this Dense already carries LoRA (merge or drop it first)")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    kernel = dense.kernel
    shape, dtype = tuple(kernel.shape), kernel.dtype
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    axes = logical_axes(kernel) or (None,) * len(shape)
    lead_axes, (in_axis, out_axis) = tuple(axes[:-2]), tuple(axes[-2:])
    if key is None:
        a = jnp.zeros(lead + (fan_in, rank), dtype)
    else:
        bound = 1.0 / math.sqrt(fan_in)   # kaiming_uniform_(a=sqrt(5)) on a (rank, fan_in) weight
        a = jax.random.uniform(key, lead + (fan_in, rank), jnp.float32, -bound, bound).astype(dtype)
    dense.lora_a = nnx.LoRAParam(a, out_sharding=lead_axes + (in_axis, "lora_rank"), eager_sharding=False)
    dense.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, fan_out), dtype),
                                 out_sharding=lead_axes + ("lora_rank", out_axis), eager_sharding=False)
    dense.lora_rank = int(rank)
    dense.lora_alpha = float(alpha)
    dense.lora_scaling = float(alpha / rank if scaling is None else scaling)
    dropout_state("lora", dense, dropout, lead, lead_axes)


def apply_lora(model, *, llm_rank: int, vit_rank: int = 0, alpha_ratio: float = 2.0, alpha: float | None = None,
               dropout: float = 0.0, llm_targets: Sequence[str] | None = None,
               vit_targets: Sequence[str] | None = VIT_TARGETS, rngs: nnx.Rngs | int | jax.Array | None = 0):
    """Add LoRA in place to a CausalLM or an InternVL model and return it.

    ``alpha`` (the same for both parts) wins over ``alpha_ratio * rank``; scaling = alpha / rank.
    ``llm_targets`` None or empty = the family's upstream list (:data:`LLM_TARGETS`). A rank of 0
    leaves that part untouched. ``rngs`` draws the ``lora_a`` initialisation (``params`` stream).
    """
    if lora_modules(model):
        raise ValueError("the model already carries LoRA adapters; merge_lora() first (a second adapter "
                         "on top of the first is upstream issue #525)")
    groups = {g for g, _, _ in _groups(model)}
    if vit_rank and "vit" not in groups:
        raise ValueError("vit_rank > 0 needs an InternVL model (this one has no vision_model)")
    if llm_rank < 0 or vit_rank < 0:
        raise ValueError(f"LoRA ranks must be >= 0, got llm_rank={llm_rank}, vit_rank={vit_rank}")
    plan: list[tuple[LinearModule, int]] = []
    if llm_rank:
        targets = tuple(llm_targets or ()) or default_llm_targets(model)
        plan += [(m, llm_rank) for m in resolve_targets(model, targets, "llm")]
    if vit_rank:
        targets = tuple(vit_targets or ()) or VIT_TARGETS
        plan += [(m, vit_rank) for m in resolve_targets(model, targets, "vit")]
    r = _as_rngs(rngs)
    for m, rank in plan:
        a = float(alpha) if alpha is not None else float(alpha_ratio) * rank
        add_lora(_get_module(model, m.path), rank=rank, alpha=a, dropout=dropout, key=r.params())
    return model


def _drop_lora_attrs(dense: Dense) -> None:
    for name in LORA_ATTRS:
        if hasattr(dense, name):
            delattr(dense, name)


def lora_delta(dense: Dense) -> jax.Array:
    """``scaling * lora_a @ lora_b`` in float32, shaped like the kernel ((L,) in, out)."""
    a = dense.lora_a[...].astype(jnp.float32)
    b = dense.lora_b[...].astype(jnp.float32)
    return jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST) * dense.lora_scaling


def merge_lora(model):
    """Fold every adapter into its kernel (``W + scaling * A @ B``, in float32, cast back) and
    remove the LoRA attributes, in place; returns the model (a plain model again)."""
    for _, dense in lora_modules(model):
        k = dense.kernel
        k.set_value((k[...].astype(jnp.float32) + lora_delta(dense)).astype(k.dtype))
        _drop_lora_attrs(dense)
    return model


def remove_lora(model):
    """Drop every adapter without merging (back to the base model); returns the model."""
    for _, dense in lora_modules(model):
        _drop_lora_attrs(dense)
    return model


def lora_param_count(model) -> int:
    """Number of LoRA parameters (works on abstract ``nnx.eval_shape`` models too)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))))


def set_lora_dropout_key(model, key: jax.Array | None) -> None:
    """Switch LoRA dropout (and XComposer2's partial-LoRA dropout) on with ``key`` (a fresh key per
    step; every layer / module gets its own fold) or off with ``None``. Layers with dropout 0 are
    unaffected."""
    for j, (_, dense) in enumerate(lora_modules(model)):
        _set_dropout(dense, "lora", None if key is None else jax.random.fold_in(key, j))
    for j, (_, dense) in enumerate(partial_lora_dropout_modules(model)):
        _set_dropout(dense, "plora", None if key is None else jax.random.fold_in(key, PLORA_KEY_BASE + j))


PLORA_KEY_BASE = 1 << 20   # partial-LoRA modules' key folds start here (the LoRA ones keep theirs)


def partial_lora_dropout_modules(model) -> list[tuple[tuple[str, ...], Dense]]:
    """(path, Dense) of every Dense whose partial-LoRA branch has dropout."""
    return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if isinstance(m, Dense) and getattr(m, "plora_dropout_key", None) is not None]


def _set_dropout(dense: Dense, prefix: str, key: jax.Array | None) -> None:
    state_key = getattr(dense, f"{prefix}_dropout_key", None)
    if state_key is None:
        return
    on = getattr(dense, f"{prefix}_dropout_on")
    lead = tuple(on.shape)
    if key is None:
        on.set_value(jnp.zeros(lead, bool))
        return
    n = int(np.prod(lead)) if lead else 1
    data = jax.random.key_data(jax.random.split(key, n)).reshape(lead + state_key.shape[len(lead):])
    state_key.set_value(data.astype(state_key.dtype))
    on.set_value(jnp.ones(lead, bool))


def lora_summary(model) -> list[dict]:
    """One dict per adapted module: path, HF module name, group, rank, alpha, scaling, dropout."""
    by_path = {m.path: m for m in linear_modules(model)}
    out = []
    for path, dense in lora_modules(model):
        m = by_path.get(path)
        out.append(dict(path=path, hf_name=None if m is None else m.hf_name, group=None if m is None else m.group,
                        module=m, rank=dense.lora_rank, alpha=dense.lora_alpha, scaling=dense.lora_scaling,
                        dropout=dense.lora_dropout))
    return out


def most_common(values: Iterable):
    return collections.Counter(values).most_common(1)[0][0]


def peft_target_names(model, modules: Sequence[LinearModule]) -> list[str] | str:
    """peft ``target_modules`` that select exactly ``modules`` among the model's HF module names:
    for each module the shortest dotted suffix (without the layer index) that selects nothing else;
    a full-match regex when no such list exists."""
    from mmjax.weights.rules import module_names
    concrete_universe = set(module_names(model))
    wanted = {n for m in modules for n in m.hf_names()}
    names: list[str] = []
    for m in modules:
        parts = m.hf_name.split(".")
        found = None
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if "{i}" in suffix:
                break
            sel = {u for u in concrete_universe if _matches(u, suffix)}
            if sel and sel <= wanted:
                found = suffix
                break
        if found is None:
            pattern = "|".join(re.escape(m.hf_name).replace(re.escape("{i}"), r"\d+") for m in modules)
            return f"({pattern})"
        if found not in names:
            names.append(found)
    return names
