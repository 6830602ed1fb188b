"""InternLM-XComposer2-4KHD-7B (CLIP ViT-L/14-336 on an HD grid of up to 16 crops + a global view),
full fine-tuning as its fine-tune script (`--hd_num 16`, max length 4096, global batch 64 samples):
lr 1e-5, wd 0.1, beta2 0.95, 1 % warmup, cosine; the ViT trained (`--fix_vit False`, as the 2.5
script says it; set `--config.freeze.backbone=True` for `--fix_vit True`).

    python -m mmjax.train --config=configs/ixc2_4khd_7b.py --config.data.data_txt=path/to/data.txt
"""

from mmjax.config import xcomposer2_finetune


def get_config():
    return xcomposer2_finetune("ixc2_4khd_7b", "pretrained/internlm-xcomposer2-4khd-7b", img_size=336, hd_num=16,
                               hd_variant="4khd", max_length=4096, samples_per_step=64)
