"""The embedded default's initial checkpoint: a random tiny InternVL written in the upstream
InternVL-Chat layout (config.json + model.safetensors + tokenizer), so that training then loads it
with ``mmjax.from_pretrained`` exactly as it loads a user's Mini-InternVL-Chat checkpoint."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from mmjax.data.synthetic import QUESTIONS, build_tiny_tokenizer


def upstream_config(cfg, vocab_size: int, template: str) -> dict:
    """An ``internvl_chat`` config.json for the sizes in ``cfg.synthetic``."""
    v, l = dict(cfg.synthetic.vision), dict(cfg.synthetic.llm)
    head_dim = l["hidden_size"] // l["num_attention_heads"]
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": template,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": v["image_size"],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": int(cfg.data.max_dynamic_patch),
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "vision_config": {"model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "num_channels": 3,
                          "hidden_act": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
                          "initializer_range": 0.02, **v},
        "llm_config": {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
                       "vocab_size": vocab_size, "bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
                       "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                       "head_dim": head_dim, "rope_scaling": None, **l},
    }


def build_tiny_checkpoint(cfg, out_dir: str, data_paths: dict) -> str:
    """Create (once) the tokenizer and the random checkpoint; returns the checkpoint directory."""
    import mmjax
    from mmjax.data.templates import get_template
    from mmjax.models.internvl import InternVL, InternVLConfig

    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(os.path.join(out_dir, "DONE")):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    template = cfg.data.template
    corpus = []
    for split in ("train", "eval"):
        with open(data_paths[split]) as f:
            for line in f:
                for turn in json.loads(line)["conversations"]:
                    corpus.append(turn["value"].replace("<image>", ""))
    tpl = get_template(template)
    corpus += [cfg.data.get("system_message") or tpl.default_system or ""] * 50 + list(QUESTIONS.values()) * 50
    tokenizer = build_tiny_tokenizer(out_dir, corpus)

    hf_config = upstream_config(cfg, len(tokenizer), template)
    icfg = InternVLConfig.from_internvl_chat(hf_config, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVL(icfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
    head_scale = float(cfg.synthetic.get("head_init_scale", 1.0))
    if head_scale != 1.0:
        # a frozen random output head bounds the logits (the final RMSNorm fixes |h|): a base that
        # only LoRA will adapt needs a head able to express confident answers
        head = model.language_model.lm_head
        head.set_value(head[...] * head_scale)
    mmjax.save_pretrained(model, out_dir, layout="internvl_chat", hf_config=hf_config)
    with open(os.path.join(out_dir, "DONE"), "w") as f:
        f.write("ok\n")
    return out_dir
