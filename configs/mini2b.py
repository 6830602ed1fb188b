"""Mini-InternVL-Chat-2B-V1-5 (InternViT-300M + InternLM2-chat-1.8B), upstream 2nd-finetune settings
(`internvl1.5/2nd_finetune/internvl_chat_v1_5_internlm2_1_8b_dynamic_res_2nd_finetune_full.sh`):
lr 4e-5, wd 0.01, drop path 0.1, frozen ViT, cosine with 3% warmup, 1 epoch, max length 4096.

    python -m mmjax.train --config=configs/mini2b.py --config.data.meta_path=path/to/meta.json
"""

from mmjax.config import second_finetune


def get_config():
    return second_finetune("mini2b", "pretrained/Mini-InternVL-Chat-2B-V1-5", "internlm2-chat",
                           lr=4e-5, weight_decay=0.01, drop_path_rate=0.1)
