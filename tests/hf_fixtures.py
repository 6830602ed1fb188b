"""Tiny random HF causal-LM checkpoints built with transformers' own classes (float32).

Shared by the decoder tests and the weight-loader tests:

    model, hf_config, tensors = build("qwen3")        # torch model (eval), config dict, {key: np.ndarray}
    path = save("phi3_longrope", tmp_path / "phi3")    # a real HF directory (config.json + model.safetensors)

Names: qwen3 (tied), qwen3_untied, qwen2 (q/k/v bias), llama (GQA), llama_dynamic (dynamic NTK),
phi3 (default rope), phi3_longrope (su factors, original context 32), internlm2 (a LlamaForCausalLM
re-keyed into InternLM2 names with q/k/v packed into the grouped ``wqkv`` layout),
internlm2_dynamic (same with rope_scaling {type: dynamic}).

Every tensor is re-drawn (norm weights near 1, biases non-zero) so that a wrong mapping of any
single tensor shows in the logits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

VOCAB, HIDDEN, INTER, LAYERS = 96, 64, 112, 2
PHI3_ORIGINAL_CONTEXT = 32
HEAD_DIM = HIDDEN // 4


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def _phi3_factors(n, seed):
    rng = np.random.default_rng(seed)
    return [float(x) for x in 1.0 + rng.uniform(0.0, 3.0, n)], [float(x) for x in 1.0 + rng.uniform(2.0, 12.0, n)]


def legacy_phi3_longrope_config() -> dict:
    """A config.json as upstream Phi-3-mini-128k writes it (legacy ``rope_scaling`` type ``su``)."""
    short, long = _phi3_factors(HEAD_DIM // 2, 7)
    return dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=VOCAB, hidden_size=HIDDEN,
                intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4 * PHI3_ORIGINAL_CONTEXT,
                original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT, rope_theta=10000.0,
                rope_scaling={"type": "su", "short_factor": short, "long_factor": long},
                rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(name: str):
    """The transformers config object of a fixture (InternLM2 fixtures: the Llama it is built from)."""
    from transformers import LlamaConfig, Phi3Config, Qwen2Config, Qwen3Config
    if name in ("qwen3", "qwen3_untied"):
        return Qwen3Config(**_common(head_dim=32, tie_word_embeddings=(name == "qwen3")))
    if name == "qwen2":
        return Qwen2Config(**_common(tie_word_embeddings=False))
    if name in ("llama", "internlm2"):
        return LlamaConfig(**_common(tie_word_embeddings=False, rope_theta=50000.0))
    if name in ("llama_dynamic", "internlm2_dynamic"):
        return LlamaConfig(**_common(tie_word_embeddings=False, max_position_embeddings=32,
                                     rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    if name == "phi3":
        return Phi3Config(**_common(rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False))
    if name == "phi3_longrope":
        legacy = legacy_phi3_longrope_config()
        # transformers 5 validates original_max_position_embeddings inside the rope dict too
        legacy["rope_scaling"] = dict(legacy["rope_scaling"],
                                      original_max_position_embeddings=PHI3_ORIGINAL_CONTEXT)
        return Phi3Config(**legacy)
    raise KeyError(name)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def pack_wqkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, num_kv_heads: int,
              head_dim: int) -> np.ndarray:
    """Llama-style q (Hq*D, ...), k/v (Hkv*D, ...) -> InternLM2 ``wqkv`` rows grouped per KV head:
    for kv head j: [q_{jG}, ..., q_{jG+G-1}, k_j, v_j] (works for weights and biases)."""
    g = num_heads // num_kv_heads
    rest = q.shape[1:]
    qg = q.reshape(num_kv_heads, g, head_dim, *rest)
    kg = k.reshape(num_kv_heads, 1, head_dim, *rest)
    vg = v.reshape(num_kv_heads, 1, head_dim, *rest)
    return np.concatenate([qg, kg, vg], axis=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


def llama_to_internlm2(hf_cfg, tensors: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """Re-key a Llama state dict into an upstream InternLM2 checkpoint (+ its config.json dict)."""
    hq, hkv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    d = hf_cfg.hidden_size // hq
    out = {"model.tok_embeddings.weight": tensors["model.embed_tokens.weight"],
           "model.norm.weight": tensors["model.norm.weight"],
           "output.weight": tensors["lm_head.weight"]}
    for i in range(hf_cfg.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"model.layers.{i}."
        out[o + "attention.wqkv.weight"] = pack_wqkv(tensors[p + "self_attn.q_proj.weight"],
                                                    tensors[p + "self_attn.k_proj.weight"],
                                                    tensors[p + "self_attn.v_proj.weight"], hq, hkv, d)
        out[o + "attention.wo.weight"] = tensors[p + "self_attn.o_proj.weight"]
        out[o + "feed_forward.w1.weight"] = tensors[p + "mlp.gate_proj.weight"]
        out[o + "feed_forward.w3.weight"] = tensors[p + "mlp.up_proj.weight"]
        out[o + "feed_forward.w2.weight"] = tensors[p + "mlp.down_proj.weight"]
        out[o + "attention_norm.weight"] = tensors[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = tensors[p + "post_attention_layernorm.weight"]
    rp = hf_cfg.rope_parameters or {}
    rope_type = rp.get("rope_type", "default")
    config = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                  auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
                  vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size,
                  intermediate_size=hf_cfg.intermediate_size, num_hidden_layers=hf_cfg.num_hidden_layers,
                  num_attention_heads=hq, num_key_value_heads=hkv, hidden_act="silu",
                  max_position_embeddings=hf_cfg.max_position_embeddings, rms_norm_eps=hf_cfg.rms_norm_eps,
                  bias=False, rope_theta=float(rp.get("rope_theta", 10000.0)),
                  rope_scaling=None if rope_type == "default" else {"type": rope_type, "factor": rp["factor"]},
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  torch_dtype="float32")
    return config, out


def build(name: str, seed: int = 0):
    """(torch model in eval mode, HF config dict as config.json holds it, {key: float32 ndarray}).

    For the InternLM2 fixtures the torch model is the Llama reference it was re-keyed from (it computes
    exactly what InternLM2 computes), while the config dict and tensors are InternLM2's."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = hf_config(name)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    _randomize(model, seed)
    model.eval()
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if name.startswith("internlm2"):
        config, tensors = llama_to_internlm2(cfg, tensors)
        return model, config, tensors
    if name == "phi3_longrope":
        return model, legacy_phi3_longrope_config(), tensors
    config = cfg.to_dict()
    config["architectures"] = [type(model).__name__]
    return model, config, tensors


def save(name: str, out_dir, seed: int = 0) -> str:
    """Write the fixture as a real HF directory (``save_pretrained(safe_serialization=True)``; the
    InternLM2 fixtures write config.json + model.safetensors in the upstream remote-code layout)."""
    out_dir = os.fspath(out_dir)
    model, config, tensors = build(name, seed)
    if name.startswith("internlm2"):
        from safetensors.numpy import save_file
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@torch.no_grad()
def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    """float32 logits of the torch reference."""
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False, **kw)
    return out.logits.float().numpy()
