"""Qwen3 (``Qwen3ForCausalLM``, InternVL3.5): explicit head_dim, per-head q/k RMSNorm, no qkv bias
(unless ``attention_bias``), tied or untied embeddings."""

from __future__ import annotations

from mmjax.models.decoder import DecoderConfig, hf_get, rope_from_hf
from mmjax.models.llama import _dims, llama_style_rules
from mmjax.weights.rules import TensorRule


def config_from_hf(hf: dict, **overrides) -> DecoderConfig:
    if hf.get("use_sliding_window"):
        raise NotImplementedError("Qwen3 sliding-window attention is not supported")
    dims = _dims(hf)
    bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        family="qwen3", **dims,
        rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
        rope=rope_from_hf(hf, dims["head_dim"]),
        qkv_bias=bias, o_bias=bias, qk_norm=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **overrides)


def weight_rules(cfg: DecoderConfig) -> list[TensorRule]:
    return llama_style_rules(cfg)
