"""InternLM-XComposer-2.5-7B (CLIP ViT-L/14 at 560 px on an HD grid of up to 18 crops + a global view),
full fine-tuning as `finetune/finetune.sh`: `--hd_num 18`, max length 16384, `--fix_vit False`,
`--fix_sampler False`, global batch 8 GPUs x 2 samples x 8 accumulation = 128 samples; lr 1e-5,
wd 0.1, beta2 0.95, 1 % warmup, cosine.

    python -m mmjax.train --config=configs/ixc2d5_7b.py --config.data.data_txt=finetune/data.txt
"""

from mmjax.config import xcomposer2_finetune


def get_config():
    return xcomposer2_finetune("ixc2d5_7b", "pretrained/internlm-xcomposer2d5-7b", img_size=560, hd_num=18,
                               hd_variant="2.5", max_length=16384, samples_per_step=128)
