"""Llama (``LlamaForCausalLM``) and Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``: q/k/v bias) decoders.

Separate q/k/v and gate/up/down projections; ``llama_style_rules`` is shared with Qwen3.
"""

from __future__ import annotations

from mmjax.models.decoder import DecoderConfig, hf_get, rope_from_hf
from mmjax.weights.rules import TensorRule


def _dims(hf: dict) -> dict:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    return dict(vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
                num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(hf_get(hf, "num_key_value_heads", default=heads)), head_dim=head_dim,
                intermediate_size=int(hf["intermediate_size"]))


def config_from_hf(hf: dict, **overrides) -> DecoderConfig:
    arch = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    is_qwen2 = arch == "Qwen2ForCausalLM" or model_type == "qwen2"
    if is_qwen2 and hf.get("use_sliding_window"):
        raise NotImplementedError("Qwen2 sliding-window attention is not supported")
    dims = _dims(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        family="qwen2" if is_qwen2 else "llama",
        **dims,
        rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
        rope=rope_from_hf(hf, dims["head_dim"]),
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if is_qwen2 else attention_bias,
        mlp_bias=False if is_qwen2 else bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **overrides)


def _linear(key: str, path: tuple[str, ...], bias: bool) -> list[TensorRule]:
    rules = [TensorRule(f"{key}.weight", path + ("kernel",), "linear")]
    if bias:
        rules.append(TensorRule(f"{key}.bias", path + ("bias",), "none"))
    return rules


def llama_style_rules(cfg: DecoderConfig) -> list[TensorRule]:
    layer, L = "model.layers.{i}", ("layers",)
    rules = [TensorRule("model.embed_tokens.weight", ("embed_tokens",), "none")]
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += _linear(f"{layer}.self_attn.{name}", L + ("attn", name), cfg.qkv_bias)
    rules += _linear(f"{layer}.self_attn.o_proj", L + ("attn", "o_proj"), cfg.o_bias)
    if cfg.qk_norm:
        rules += [TensorRule(f"{layer}.self_attn.q_norm.weight", L + ("attn", "q_norm", "weight")),
                  TensorRule(f"{layer}.self_attn.k_norm.weight", L + ("attn", "k_norm", "weight"))]
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += _linear(f"{layer}.mlp.{name}", L + ("mlp", name), cfg.mlp_bias)
    rules += [TensorRule(f"{layer}.input_layernorm.weight", L + ("input_norm", "weight")),
              TensorRule(f"{layer}.post_attention_layernorm.weight", L + ("post_attention_norm", "weight")),
              TensorRule("model.norm.weight", ("final_norm", "weight"))]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), "linear"))
    return rules


def weight_rules(cfg: DecoderConfig) -> list[TensorRule]:
    return llama_style_rules(cfg)
