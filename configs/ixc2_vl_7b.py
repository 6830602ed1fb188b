"""InternLM-XComposer2-VL-7B (CLIP ViT-L/14 at 490 px + partial-LoRA InternLM2-7B), full fine-tuning
as its fine-tune script (`InternLM-XComposer-2.0/finetune/finetune.sh`: `--img_size 490 --hd_num -1`,
max length 4096, global batch 64 samples): lr 1e-5, wd 0.1, beta2 0.95, 1 % warmup, cosine; the ViT trained (`--fix_vit False`, as the 2.5
script says it; set `--config.freeze.backbone=True` for `--fix_vit True`).

    python -m mmjax.train --config=configs/ixc2_vl_7b.py --config.data.data_txt=path/to/data.txt
"""

from mmjax.config import xcomposer2_finetune


def get_config():
    return xcomposer2_finetune("ixc2_vl_7b", "pretrained/internlm-xcomposer2-vl-7b", img_size=490, hd_num=-1,
                               max_length=4096, samples_per_step=64)
