"""Tiny random InternVL checkpoints written as real HF directories (safetensors + config.json).

Two layouts:
- ``make_hf_internvl``: transformers' ``InternVLForConditionalGeneration`` (``model_type: internvl``),
  saved with ``save_pretrained`` (whatever key naming the installed transformers writes).
- ``make_upstream_internvl``: the upstream InternVL-Chat layout (``model_type: internvl_chat``,
  ``vision_model.*`` with fused ``attn.qkv``, ``mlp1.0/1/3``, ``language_model.*``), converted from the
  same transformers model, so the torch model returned is its reference.

Both return ``(directory, torch_model)``; the torch model is in eval mode, float32, eager attention.
ViT variants: ``"300m"`` (layer_norm, qkv bias, no qk-norm) and ``"6b"`` (rms_norm, qk-norm, no qkv bias).
Text models: ``"qwen3"`` (default) or ``"qwen2"``.
"""

from __future__ import annotations

import json
import os

import numpy as np

IMAGE_TOKEN_ID = 100     # <IMG_CONTEXT> in the tiny vocab
VOCAB_SIZE = 128
IMAGE_SIZE = 56          # 4x4 patch grid with patch 14 -> 4 tokens per tile after pixel shuffle 0.5
PATCH_SIZE = 14
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4


def vision_config(vit: str = "300m") -> dict:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, layer_norm_eps=1e-6, hidden_act="gelu")
    if vit == "300m":
        base.update(norm_type="layer_norm", attention_bias=True, use_qk_norm=False)
    elif vit == "6b":
        base.update(norm_type="rms_norm", attention_bias=False, use_qk_norm=True)
    else:
        raise ValueError(vit)
    return base


def text_config(text: str = "qwen3") -> dict:
    base = dict(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6, max_position_embeddings=256,
                tie_word_embeddings=False, rope_theta=10000.0)
    if text == "qwen3":
        base.update(model_type="qwen3", head_dim=16)
    elif text == "qwen2":
        base.update(model_type="qwen2")
    else:
        raise ValueError(text)
    return base


def _randomize(model, seed: int) -> None:
    """Every parameter random (HF inits zeros / ones for many): norms ~ 1 +- 0.1, layer scales ~ 0.5."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            elif "lambda_" in name:
                p.copy_(0.5 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.02 * r)
            elif p.ndim >= 2 and not any(s in name for s in ("embed_tokens", "position_embeddings", "cls_token")):
                p.copy_(r / np.sqrt(int(np.prod(p.shape[1:]))))      # Linear / Conv: unit fan-in scale
            else:
                p.copy_(0.5 * r)                                       # embeddings, cls, positions


def build_hf_model(vit: str = "300m", text: str = "qwen3", seed: int = 0):
    """The transformers reference model (not saved)."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    cfg = InternVLConfig(vision_config=vision_config(vit), text_config=text_config(text),
                         image_token_id=IMAGE_TOKEN_ID, image_seq_length=TOKENS_PER_TILE,
                         downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                         tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval().to(torch.float32)
    _randomize(model, seed)
    return model


def make_hf_internvl(out_dir: str, vit: str = "300m", text: str = "qwen3", seed: int = 0,
                     canonical_keys: bool = False):
    """Write a transformers-native InternVL checkpoint; returns ``(out_dir, torch_model)``.

    ``save_pretrained`` of transformers 5.x writes the older key spelling (``language_model.model.*``,
    ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``); with
    ``canonical_keys`` the tensors are rewritten under the in-memory names (``model.language_model.*``,
    ``lm_head.weight``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``). Loaders must read both.
    """
    from safetensors.numpy import save_file
    model = build_hf_model(vit, text, seed)
    model.save_pretrained(out_dir)
    if canonical_keys:
        for name in os.listdir(out_dir):
            if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
                os.remove(os.path.join(out_dir, name))
        save_file({k: np.ascontiguousarray(v) for k, v in canonical_hf_state_dict(model).items()},
                  os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir, model


def canonical_hf_state_dict(model) -> dict[str, np.ndarray]:
    """The reference model's tensors under transformers' in-memory names
    (``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def hf_to_upstream_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename / fuse a canonical transformers InternVL state dict into upstream InternVL-Chat keys."""
    vit_names = {
        "embeddings.cls_token": "embeddings.class_embedding",
        "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
        "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
        "embeddings.position_embeddings": "embeddings.position_embedding",
    }
    layer_names = {
        "attention.projection_layer": "attn.proj", "attention.q_norm": "attn.q_norm",
        "attention.k_norm": "attn.k_norm", "layernorm_before": "norm1", "layernorm_after": "norm2",
        "lambda_1": "ls1", "lambda_2": "ls2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    proj_names = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
    out: dict[str, np.ndarray] = {}
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, val in sd.items():
        if key.startswith("model.vision_tower."):
            rest = key[len("model.vision_tower."):]
            if rest in vit_names:
                out["vision_model." + vit_names[rest]] = val
                continue
            assert rest.startswith("encoder.layer."), rest
            _, _, idx, sub = rest.split(".", 3)
            for q in ("q_proj", "k_proj", "v_proj"):
                if sub.startswith("attention." + q + "."):
                    suffix = sub.rsplit(".", 1)[1]
                    qkv.setdefault(f"vision_model.encoder.layers.{idx}.attn.qkv.{suffix}", {})[q] = val
                    break
            else:
                mod, suffix = sub.rsplit(".", 1) if not sub.startswith("lambda_") else (sub, None)
                new = layer_names[mod] + ("" if suffix is None else "." + suffix)
                out[f"vision_model.encoder.layers.{idx}.{new}"] = val
        elif key.startswith("model.multi_modal_projector."):
            mod, suffix = key[len("model.multi_modal_projector."):].split(".")
            out[f"mlp1.{proj_names[mod]}.{suffix}"] = val
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model."):]] = val
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = val
        else:
            raise KeyError(key)
    for key, parts in qkv.items():
        out[key] = np.concatenate([parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
    return out


def upstream_config(model, vit: str, text: str) -> dict:
    vc = model.config.vision_config
    tc = model.config.text_config.to_dict()
    tc["architectures"] = ["Qwen3ForCausalLM" if text == "qwen3" else "Qwen2ForCausalLM"]
    tc["tie_word_embeddings"] = False
    tc["rope_theta"] = (tc.get("rope_parameters") or {}).get("rope_theta", 10000.0)   # 4.x-style field too
    vision = dict(
        model_type="intern_vit_6b", architectures=["InternVisionModel"], hidden_size=vc.hidden_size,
        num_hidden_layers=vc.num_hidden_layers, num_attention_heads=vc.num_attention_heads,
        intermediate_size=vc.intermediate_size, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        norm_type=vc.norm_type, layer_norm_eps=vc.layer_norm_eps, qkv_bias=vc.attention_bias,
        qk_normalization=vc.use_qk_norm, hidden_act="gelu", drop_path_rate=0.0, dropout=0.0,
        attention_dropout=0.0, initializer_factor=0.1, initializer_range=0.02, use_flash_attn=False)
    return dict(
        architectures=["InternVLChatModel"], model_type="internvl_chat", vision_config=vision, llm_config=tc,
        template="internvl2_5", ps_version="v2", select_layer=-1, downsample_ratio=0.5,
        force_image_size=IMAGE_SIZE, dynamic_image_size=True, use_thumbnail=True, max_dynamic_patch=6,
        min_dynamic_patch=1, use_backbone_lora=0, use_llm_lora=0, pad2square=False, tie_word_embeddings=False,
        torch_dtype="float32")


def make_upstream_internvl(out_dir: str, vit: str = "300m", text: str = "qwen3", seed: int = 0):
    """Write an upstream InternVL-Chat checkpoint; returns ``(out_dir, torch_model)`` where the torch
    model is the transformers model holding the same weights (the numerical reference)."""
    from safetensors.numpy import save_file
    model = build_hf_model(vit, text, seed)
    tensors = hf_to_upstream_state_dict(canonical_hf_state_dict(model))
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(upstream_config(model, vit, text), f, indent=2)
    return out_dir, model


def load_safetensors_dir(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file or sharded)."""
    from safetensors.numpy import load_file
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out
