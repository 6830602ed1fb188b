"""A Qwen3-based InternVL in the Intern-S1-mini shape (InternViT-300M + Qwen3-8B), in the
transformers-native InternVL layout (e.g. an InternVL3.5 `-HF` checkpoint), template qwen3,
InternVL3.5-style settings: lr 2e-5, wd 0.05, drop path 0.1, frozen ViT, max length 8192."""

from mmjax.config import second_finetune


def get_config():
    return second_finetune("intern_s1_mini", "pretrained/InternVL3_5-8B-HF", "qwen3",
                           lr=2e-5, weight_decay=0.05, drop_path_rate=0.1, max_length=8192)
