"""Registry: HF ``architectures[0]`` / ``model_type`` (or an mmjax family name) -> family module.

Each family module provides ``config_from_hf(hf_config: dict) -> DecoderConfig`` and
``weight_rules(cfg) -> list[TensorRule]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# key -> module name under mmjax.models
FAMILIES: dict[str, str] = {
    "InternLM2ForCausalLM": "internlm2", "internlm2": "internlm2",
    "Phi3ForCausalLM": "phi3", "phi3": "phi3",
    "Qwen3ForCausalLM": "qwen3", "qwen3": "qwen3",
    "Qwen2ForCausalLM": "llama", "qwen2": "llama",
    "LlamaForCausalLM": "llama", "llama": "llama",
}


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def family_module(name_or_hf_config: str | dict) -> ModuleType:
    """The family module for a family / architecture / model_type name, or for an HF config dict
    (``architectures[0]`` first, then ``model_type``)."""
    if isinstance(name_or_hf_config, dict):
        hf = name_or_hf_config
        candidates = list(hf.get("architectures") or [])[:1] + [hf.get("model_type")]
    else:
        candidates = [name_or_hf_config]
    for c in candidates:
        if c in FAMILIES:
            return importlib.import_module(f"mmjax.models.{FAMILIES[c]}")
    raise ValueError(f"unsupported decoder {candidates}; supported architectures / model types: {_supported()}")


def config_from_hf(hf_config: dict):
    """DecoderConfig for any supported HF causal-LM config dict."""
    return family_module(hf_config).config_from_hf(hf_config)
