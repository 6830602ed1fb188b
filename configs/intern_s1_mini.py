"""Intern-S1-mini (InternViT-300M + Qwen3-8B, `internlm/Intern-S1-mini`) fine-tuned as XTuner v1
documents it. Sources: XTuner's tutorial "Fine-tuning Multimodal Large Models with Trainer" (T), its
config defaults `xtuner/v1/config/optim.py` (O), `InternS1MiniConfig` / `InternS1VisionConfig` (M)
and `InternS1VLTokenizeFnConfig` (D).

    python -m mmjax.train --config=configs/intern_s1_mini.py \
        --config.data.datasets_json='[{"anno_path": "data/sft.jsonl", "media_root": "data/"}]'

The checkpoint's tensors carry transformers InternVL's names under model_type `interns1`, which
mmjax reads as that layout. Its tokenizer class is remote code: point `config.tokenizer_path` at a
tokenizer directory transformers reads without it if the checkpoint's own does not load.
"""

from mmjax.config import base_config


def get_config():
    c = base_config()
    c.name = "intern_s1_mini"
    c.model_path = "pretrained/Intern-S1-mini"
    c.data.template = "intern-s1"         # T: chat_template "intern-s1", its default system prompt
    c.optim.lr = 1e-6                     # T: AdamWConfig(lr=1e-6)
    c.optim.b1, c.optim.b2 = 0.9, 0.95    # O: AdamW betas
    c.optim.eps = 1e-8                    # O
    c.optim.weight_decay = 0.01           # O
    c.optim.clip_norm = 1.0               # O: max_grad_norm
    c.optim.schedule = "cosine"           # T: LRConfig(lr_type="cosine", warmup_ratio=0)
    c.optim.warmup_ratio = 0.0
    c.optim.min_lr_ratio = 1e-6 / c.optim.lr   # O: lr_min 1e-6 (the cosine's floor; at lr 1e-6, flat)
    c.num_epochs = 2                      # T: epoch_num=2
    c.freeze.backbone = False             # M: freeze_vision / projector / language all False
    c.freeze.mlp = False
    c.freeze.llm = False
    c.model.drop_path_rate = 0.0          # M: InternS1VisionConfig drop_path_rate
    c.data.max_length = 8192              # T: sample_max_length
    c.data.pack_max_length = 16384        # T: pack_max_length
    c.data.batch_size = 8                 # T: global_batch_size=8 packs a step
    c.data.max_tiles_per_pack = 64        # a full row of 256-token tiles
    c.data.dynamic_image_size = True      # M: dynamic_image_size, 1-12 tiles + thumbnail
    c.data.min_dynamic_patch, c.data.max_dynamic_patch = 1, 12
    c.data.use_thumbnail = True
    c.data.min_num_frame, c.data.max_num_frame = 4, 24   # D: min/max_num_frames
    return c
