"""InternVL-Chat-V1-5 (InternViT-6B + InternLM2-chat-20B, 26B), upstream 2nd-finetune settings
(`..._internlm2_20b_dynamic_res_2nd_finetune_full.sh`): lr 2e-5, wd 0.05, drop path 0.4, frozen
ViT (stored in bf16). Needs a multi-device mesh, e.g. --config.mesh.fsdp=8."""

from mmjax.config import second_finetune


def get_config():
    c = second_finetune("internvl_chat_v1_5", "pretrained/InternVL-Chat-V1-5", "internlm2-chat",
                        lr=2e-5, weight_decay=0.05, drop_path_rate=0.4, grad_accum=8)
    c.model.frozen_param_dtype = "bfloat16"
    return c
