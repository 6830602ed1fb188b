"""Mini-InternVL-Chat-4B-V1-5 (InternViT-300M + Phi-3-mini-128k), upstream 2nd-finetune settings
(`..._phi3_3_8b_dynamic_res_2nd_finetune_full.sh`): lr 4e-5, wd 0.05, drop path 0.1, frozen ViT."""

from mmjax.config import second_finetune


def get_config():
    return second_finetune("mini4b", "pretrained/Mini-InternVL-Chat-4B-V1-5", "phi3-chat",
                           lr=4e-5, weight_decay=0.05, drop_path_rate=0.1)
