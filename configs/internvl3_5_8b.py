"""InternVL3.5-8B (InternViT-300M + Qwen3-8B) in the transformers-native InternVL layout (an
`OpenGVLab/InternVL3_5-8B-HF` checkpoint): lr 2e-5, wd 0.05, drop path 0.1, frozen ViT, max length
8192, the InternVL chat template (`internvl2_5`: chatml with InternVL's system prompt; Qwen3's own
template would render think blocks upstream's SFT data does not have).

    python -m mmjax.train --config=configs/internvl3_5_8b.py --config.data.meta_path=path/to/meta.json
"""

from mmjax.config import second_finetune


def get_config():
    return second_finetune("internvl3_5_8b", "pretrained/InternVL3_5-8B-HF", "internvl2_5",
                           lr=2e-5, weight_decay=0.05, drop_path_rate=0.1, max_length=8192)
