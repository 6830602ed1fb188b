"""The architecture part of the seed checkpoints' ``config.json`` (no weights), by checkpoint
folder name: what the memory planner compiles against when the checkpoint is not on disk.

Numbers from the upstream configs (InternViT-300M-448px / InternViT-6B-448px-V1-5 vision configs,
internlm2-chat-1_8b / Phi-3-mini-128k / internlm2-chat-20b LLM configs, vocabularies enlarged by
InternVL's 9 added tokens). Rotary scaling factors change rotary tables only, never shapes.
"""

from __future__ import annotations

import copy

_VIT_300M = dict(
    architectures=["InternVisionModel"], model_type="intern_vit_6b",
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    norm_type="layer_norm", layer_norm_eps=1e-6, qkv_bias=True, qk_normalization=False,
    image_size=448, patch_size=14, num_channels=3, hidden_act="gelu", initializer_factor=0.1,
    drop_path_rate=0.0, use_flash_attn=True)

_VIT_6B_V1_5 = dict(_VIT_300M, hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                    intermediate_size=12800, norm_type="rms_norm", qkv_bias=False, qk_normalization=True)

_INTERNLM2_1_8B = dict(
    architectures=["InternLM2ForCausalLM"], model_type="internlm2",
    vocab_size=92553,                      # 92544 + the 9 InternVL tokens
    hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
    intermediate_size=8192, rope_theta=1000000, max_position_embeddings=32768,
    rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5, bias=False,
    hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)

_INTERNLM2_20B = dict(_INTERNLM2_1_8B, hidden_size=6144, num_hidden_layers=48, num_attention_heads=48,
                      num_key_value_heads=8, intermediate_size=16384, rope_scaling={"type": "dynamic", "factor": 3.0})


def _ramp(n: int, lo: float, hi: float) -> list[float]:
    # stand-in longrope factors (monotone): they change rotary tables, not memory or FLOPs
    return [round(lo + (hi - lo) * i / (n - 1), 4) for i in range(n)]


_PHI3_MINI_128K = dict(
    architectures=["Phi3ForCausalLM"], model_type="phi3",
    vocab_size=32020,                      # 32011 + the 9 InternVL tokens (computed)
    hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=8192, rope_theta=10000.0, max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rope_scaling={"type": "su", "short_factor": _ramp(48, 1.0, 1.2), "long_factor": _ramp(48, 1.0, 40.0)},
    rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
    tie_word_embeddings=False)


def _internvl_chat(vision: dict, llm: dict, template: str) -> dict:
    return dict(architectures=["InternVLChatModel"], model_type="internvl_chat", template=template,
                force_image_size=448, downsample_ratio=0.5, ps_version="v2", select_layer=-1,
                dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
                use_llm_lora=0, use_backbone_lora=0, vision_config=dict(vision), llm_config=dict(llm))


# Intern-S1-mini (XTuner's InternS1MiniConfig: InternViT-300M in transformers' field names, Qwen3-8B
# with a 153,216-row vocabulary, <IMG_CONTEXT> 152957), as the transformers InternVL config it mirrors
_INTERN_S1_MINI = dict(
    architectures=["InternS1ForConditionalGeneration"], model_type="interns1", image_token_id=152957,
    downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
    vision_feature_select_strategy="default", tie_word_embeddings=False,
    vision_config=dict(model_type="interns1_vision", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, image_size=[448, 448], patch_size=[14, 14], num_channels=3,
                       norm_type="layer_norm", layer_norm_eps=1e-6, attention_bias=True, use_qk_norm=False,
                       layer_scale_init_value=0.1, drop_path_rate=0.0, hidden_act="gelu",
                       use_absolute_position_embeddings=True, use_mean_pooling=True),
    text_config=dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=153216, hidden_size=4096,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     intermediate_size=12288, rope_theta=1000000.0, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, attention_bias=False))

# folder name -> (config.json, the tokenizer's <IMG_CONTEXT> id)
CHECKPOINTS: dict[str, tuple[dict, int]] = {
    "Mini-InternVL-Chat-2B-V1-5": (_internvl_chat(_VIT_300M, _INTERNLM2_1_8B, "internlm2-chat"), 92546),
    "Mini-InternVL-Chat-4B-V1-5": (_internvl_chat(_VIT_300M, _PHI3_MINI_128K, "phi3-chat"), 32013),
    "InternVL-Chat-V1-5": (_internvl_chat(_VIT_6B_V1_5, _INTERNLM2_20B, "internlm2-chat"), 92546),
    "Intern-S1-mini": (_INTERN_S1_MINI, 152957),
}


def known_checkpoint(model_path: str) -> tuple[dict, int] | None:
    """(config.json dict, <IMG_CONTEXT> id) of a seed checkpoint named by ``model_path``'s last
    folder, or None."""
    import os
    entry = CHECKPOINTS.get(os.path.basename(os.path.normpath(model_path or "")))
    return None if entry is None else (copy.deepcopy(entry[0]), entry[1])
