"""InternLM2 / InternLM2.5 (``InternLM2ForCausalLM``, remote code): packed ``attention.wqkv`` grouped
per KV head (for kv head k the rows are [q_{kG} .. q_{kG+G-1}, k_k, v_k]), ``feed_forward.w1/w3/w2``
= gate/up/down, head ``output``; rope ``default`` / ``linear`` / ``dynamic`` (NTK per packed sample).

config.json keys (upstream checkpoints): hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, bias, rope_theta, rope_scaling {type, factor},
max_position_embeddings, rms_norm_eps, vocab_size, tie_word_embeddings.
"""

from __future__ import annotations

from mmjax.models.decoder import DecoderConfig, hf_get, rope_from_hf
from mmjax.weights.rules import TensorRule


def config_from_hf(hf: dict, **overrides) -> DecoderConfig:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf["hidden_size"]) // heads
    bias = bool(hf.get("bias", True))   # upstream InternLM2Config default; chat checkpoints say false
    return DecoderConfig(
        family="internlm2",
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf_get(hf, "num_key_value_heads", default=heads)), head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]),
        rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
        rope=rope_from_hf(hf, head_dim),
        qkv_layout="internlm2", qkv_bias=bias, o_bias=bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **overrides)


def weight_rules(cfg: DecoderConfig) -> list[TensorRule]:
    layer, L = "model.layers.{i}", ("layers",)
    rules = [TensorRule("model.tok_embeddings.weight", ("embed_tokens",)),
             TensorRule(f"{layer}.attention.wqkv.weight", L + ("attn", "qkv_proj", "kernel"), "linear")]
    if cfg.qkv_bias:
        rules.append(TensorRule(f"{layer}.attention.wqkv.bias", L + ("attn", "qkv_proj", "bias")))
    rules.append(TensorRule(f"{layer}.attention.wo.weight", L + ("attn", "o_proj", "kernel"), "linear"))
    if cfg.o_bias:
        rules.append(TensorRule(f"{layer}.attention.wo.bias", L + ("attn", "o_proj", "bias")))
    rules += [
        TensorRule(f"{layer}.feed_forward.w1.weight", L + ("mlp", "gate_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.feed_forward.w3.weight", L + ("mlp", "up_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.feed_forward.w2.weight", L + ("mlp", "down_proj", "kernel"), "linear"),
        TensorRule(f"{layer}.attention_norm.weight", L + ("input_norm", "weight")),
        TensorRule(f"{layer}.ffn_norm.weight", L + ("post_attention_norm", "weight")),
        TensorRule("model.norm.weight", ("final_norm", "weight")),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("output.weight", ("lm_head",), "linear"))
    modules = {path[-1]: (hf, path) for hf, path in PLORA_MODULES}
    for name, _, _ in cfg.plora:   # InternLM-XComposer2: Plora_A / Plora_B inside a projection (nn.Linear layout)
        hf, path = modules[name]
        rules += [TensorRule(f"{layer}.{hf}.Plora_A.weight", L + path + ("plora_a",), "linear"),
                  TensorRule(f"{layer}.{hf}.Plora_B.weight", L + path + ("plora_b",), "linear")]
    return rules


# the projections that carry a partial-LoRA branch in InternLM-XComposer2 (HF module -> mmjax path)
PLORA_MODULES = (("attention.wqkv", ("attn", "qkv_proj")), ("attention.wo", ("attn", "o_proj")),
                 ("feed_forward.w1", ("mlp", "gate_proj")), ("feed_forward.w3", ("mlp", "up_proj")),
                 ("feed_forward.w2", ("mlp", "down_proj")))
