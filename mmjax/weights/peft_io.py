"""peft LoRA adapters <-> mmjax LoRA (``mmjax.models.lora``).

An adapter directory holds ``adapter_config.json`` (peft ``LoraConfig`` fields) and
``adapter_model.safetensors`` with peft's keys::

    base_model.model.<HF module name>.lora_A.weight   (r, in)
    base_model.model.<HF module name>.lora_B.weight   (out, r)

The HF module names come from the model's own ``weight_rules`` (kernel key minus ``.weight``), so
they are the family's names (``model.layers.3.attention.wqkv``, ``model.layers.3.self_attn.qkv_proj``)
and, for InternVL, the layout's (``language_model.model.layers.3...`` / ``vision_model.encoder.layers.3.attn.qkv``
upstream, ``model.language_model.layers.3...`` / ``model.vision_tower.encoder.layer.3...`` transformers):
exactly what ``peft.PeftModel.from_pretrained`` expects on the matching torch model.

Loading is all or nothing: every check (config fields, target resolution, every key, every shape)
runs before the model is touched, and any misfit is a one-line ``ValueError`` naming the tensor or
module.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np

from mmjax.models import lora as L
from mmjax.weights.rules import module_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def _key(name: str, which: str) -> str:
    return f"{KEY_PREFIX}{name}.{which}.weight"


def _to_numpy(x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float16, np.float64):
        a = a.astype(np.float32)      # bfloat16 and friends: written as float32 (peft casts on load)
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def adapter_config(model, base_model_name_or_path: str | None = None, task_type: str | None = "auto") -> dict:
    """The peft ``adapter_config.json`` dict of the model's adapters."""
    summary = L.lora_summary(model)
    if not summary:
        raise ValueError("the model carries no LoRA adapters (apply_lora or load_peft_adapter first)")
    for s in summary:
        if s["module"] is None:
            raise ValueError(f"LoRA on {'.'.join(s['path'])}: no HF weight rule names this module")
    modules = [s["module"] for s in summary]
    r = L.most_common(s["rank"] for s in summary)
    alpha = L.most_common(s["alpha"] for s in summary)
    dropout = L.most_common(s["dropout"] for s in summary)
    if any(s["dropout"] != dropout for s in summary):
        raise ValueError("peft stores one lora_dropout; the adapters use several: "
                         f"{sorted({s['dropout'] for s in summary})}")
    plain = all(math.isclose(s["scaling"], s["alpha"] / s["rank"], rel_tol=1e-6) for s in summary)
    rs = all(math.isclose(s["scaling"], s["alpha"] / math.sqrt(s["rank"]), rel_tol=1e-6) for s in summary)
    if not (plain or rs):
        raise ValueError("LoRA scaling is neither alpha / r nor alpha / sqrt(r) on every module")

    def pattern(selected):
        keys = L.peft_target_names(model, selected)
        if isinstance(keys, str):
            return [keys]
        return [re.escape(k) for k in keys]

    rank_pattern, alpha_pattern = {}, {}
    for value in sorted({s["rank"] for s in summary} - {r}):
        for k in pattern([s["module"] for s in summary if s["rank"] == value]):
            rank_pattern[k] = int(value)
    for value in sorted({s["alpha"] for s in summary} - {alpha}):
        for k in pattern([s["module"] for s in summary if s["alpha"] == value]):
            alpha_pattern[k] = _num(value)
    if task_type == "auto":
        task_type = "CAUSAL_LM" if any(m.group == "llm" for m in modules) else None
    targets = L.peft_target_names(model, modules)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": _num(alpha),
        "lora_dropout": float(dropout),
        "target_modules": targets,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": bool(rs and not plain),
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "lora_bias": False,
        "auto_mapping": None,
    }


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """peft-keyed adapter tensors (``lora_A`` (r, in), ``lora_B`` (out, r)) of every adapted layer."""
    out = {}
    for s in L.lora_summary(model):
        m, dense = s["module"], L._get_module(model, s["path"])
        a, b = _to_numpy(dense.lora_a[...]), _to_numpy(dense.lora_b[...])
        if m.num_layers is None:
            a, b = a[None], b[None]
        for name, ai, bi in zip(m.hf_names(), a, b):
            out[_key(name, "lora_A")] = np.ascontiguousarray(ai.T)
            out[_key(name, "lora_B")] = np.ascontiguousarray(bi.T)
    return out


def save_peft_adapter(model, out_dir, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = "auto") -> str:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``peft.PeftModel.from_pretrained``.

    ``task_type`` 'auto' = ``CAUSAL_LM`` when the LLM is adapted (upstream), None for a ViT-only adapter.
    Returns the directory."""
    from safetensors.numpy import save_file
    out_dir = os.fspath(out_dir)
    config = adapter_config(model, base_model_name_or_path, task_type)
    tensors = adapter_tensors(model)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------

_UNSUPPORTED = {  # config field -> value that is fine
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
}
_MUST_BE_EMPTY = ("modules_to_save", "layers_to_transform", "target_parameters", "trainable_token_indices",
                  "layer_replication", "alora_invocation_tokens")


def read_adapter_config(adapter_dir) -> dict:
    path = os.path.join(os.fspath(adapter_dir), CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{CONFIG_NAME} not found in the adapter directory {os.fspath(adapter_dir)!r}")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter peft_type {cfg.get('peft_type')!r}: only LORA adapters are supported")
    for k, ok in _UNSUPPORTED.items():
        if k in cfg and cfg[k] not in (ok, None):
            raise ValueError(f"adapter_config {k}={cfg[k]!r} is not supported (needs {ok!r})")
    for k in _MUST_BE_EMPTY:
        if cfg.get(k):
            raise ValueError(f"adapter_config {k}={cfg[k]!r} is not supported")
    if cfg.get("target_modules") in (None, [], ""):
        raise ValueError("adapter_config has no target_modules")
    return cfg


def _peft_selects(cfg: dict, name: str) -> bool:
    """peft's module selection (target_modules as a full-match regex or a list of names / suffixes,
    minus exclude_modules)."""
    ex = cfg.get("exclude_modules")
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, name):
                return False
        elif any(L._matches(name, e) for e in ex):
            return False
    t = cfg["target_modules"]
    if isinstance(t, str):
        return re.fullmatch(t, name) is not None
    return any(L._matches(name, x) for x in t)


def _pattern_value(patterns: dict, name: str, default):
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def _plan(model, cfg: dict, tensors_keys) -> list[tuple[L.LinearModule, int, float, float]]:
    """(module, rank, alpha, scaling) for every module the adapter targets; raises on any misfit."""
    mods = L.linear_modules(model)
    adaptable = {n for m in mods for n in m.hf_names()}
    # modules outside the LLM / ViT linear layers that the adapter would select (lm_head, mlp1, ...)
    for name in module_names(model):
        if name not in adaptable and _peft_selects(cfg, name):
            raise ValueError(f"adapter targets module {name}, which mmjax LoRA cannot adapt "
                             f"(only LLM / ViT linear layers)")
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    plan = []
    for m in mods:
        names = m.hf_names()
        hit = [_peft_selects(cfg, n) for n in names]
        if not any(hit):
            continue
        if not all(hit):
            first = names[hit.index(False)]
            raise ValueError(f"adapter targets only some layers of {m.hf_name} (not {first}); adapters on a "
                             f"subset of stacked layers are not supported")
        rank = int(_pattern_value(cfg.get("rank_pattern"), names[0], r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), names[0], alpha0))
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        plan.append((m, rank, alpha, scaling))
    if not plan:
        first = sorted(tensors_keys)[0] if tensors_keys else "(none)"
        raise ValueError(f"adapter target_modules {cfg['target_modules']!r} select no linear module of this model "
                         f"(first adapter tensor: {first}); is it an adapter for another architecture?")
    return plan


def load_peft_adapter(model, adapter_dir):
    """Add LoRA with the adapter's config to ``model`` (in place) and load its tensors; returns the model.

    Raises ``ValueError`` (one line, naming the tensor / module) when the adapter does not fit: a
    targeted module's tensor missing, a tensor of another shape, a tensor that matches no adapted
    module, or targets this model does not have. Nothing is changed on failure."""
    from safetensors.numpy import load_file
    if L.lora_modules(model):
        raise ValueError("the model already carries LoRA adapters; merge_lora() or remove_lora() first")
    adapter_dir = os.fspath(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    wpath = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(wpath):
        raise ValueError(f"{WEIGHTS_NAME} not found in {adapter_dir!r} (adapter_model.bin is not supported)")
    tensors = load_file(wpath)
    plan = _plan(model, cfg, tensors.keys())

    expected = {_key(name, which) for m, *_ in plan for name in m.hf_names() for which in ("lora_A", "lora_B")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"adapter tensor {extra[0]} matches no LoRA module of this model "
                         f"({len(extra)} unmatched tensor(s); adapter for another architecture or layout?)")
    staged = []
    for m, rank, alpha, scaling in plan:
        dense = L._get_module(model, m.path)
        fan_in, fan_out = tuple(dense.kernel.shape[-2:])
        a_layers, b_layers = [], []
        for name in m.hf_names():
            for which, shape, sink in (("lora_A", (rank, fan_in), a_layers), ("lora_B", (fan_out, rank), b_layers)):
                key = _key(name, which)
                if key not in tensors:
                    raise ValueError(f"adapter tensor {key} is missing (its module is targeted by adapter_config)")
                got = tuple(tensors[key].shape)
                if got != shape:
                    raise ValueError(f"adapter tensor {key}: shape {got} != expected {shape} "
                                     f"(r={rank}, module in={fan_in}, out={fan_out})")
                sink.append(tensors[key].T)
        staged.append((m, dense, rank, alpha, scaling, np.stack(a_layers), np.stack(b_layers)))

    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    for m, dense, rank, alpha, scaling, a, b in staged:
        L.add_lora(dense, rank=rank, alpha=alpha, dropout=dropout, key=None, scaling=scaling)
        if m.num_layers is None:
            a, b = a[0], b[0]
        dense.lora_a.set_value(jnp.asarray(a, dense.lora_a.dtype))
        dense.lora_b.set_value(jnp.asarray(b, dense.lora_b.dtype))
    return model
