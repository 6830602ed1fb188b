"""Phi-3 (``Phi3ForCausalLM``, Mini-InternVL-4B): fused ``qkv_proj`` ([Q | K | V]) and
``gate_up_proj`` ([gate | up]); rope ``default`` or ``su`` / ``longrope`` (short/long factors chosen
per packed sample, attention factor on cos/sin in both regimes)."""

from __future__ import annotations

from mmjax.models.decoder import DecoderConfig, hf_get, rope_from_hf
from mmjax.weights.rules import TensorRule


def config_from_hf(hf: dict, **overrides) -> DecoderConfig:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf["hidden_size"]) // heads
    rope_type = (hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope_type.get("rope_type") or rope_type.get("type")
    if rope_type == "yarn":
        raise NotImplementedError("Phi-3 'yarn' rope scaling is not supported (default, su / longrope are)")
    return DecoderConfig(
        family="phi3",
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf_get(hf, "num_key_value_heads", default=heads)), head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-5)),
        rope=rope_from_hf(hf, head_dim),
        qkv_layout="fused", mlp_layout="fused_gate_up",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **overrides)


def weight_rules(cfg: DecoderConfig) -> list[TensorRule]:
    layer, L = "model.layers.{i}", ("layers",)
    rules = [
        TensorRule("model.embed_tokens.weight", ("embed_tokens",)),
        TensorRule(f"{layer}.self_attn.qkv_proj.weight", L + ("attn", "qkv_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.self_attn.o_proj.weight", L + ("attn", "o_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.mlp.gate_up_proj.weight", L + ("mlp", "gate_up_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.mlp.down_proj.weight", L + ("mlp", "down_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.input_layernorm.weight", L + ("input_norm", "weight")),
        TensorRule(f"{layer}.post_attention_layernorm.weight", L + ("post_attention_norm", "weight")),
        TensorRule("model.norm.weight", ("final_norm", "weight")),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), "linear"))
    return rules
