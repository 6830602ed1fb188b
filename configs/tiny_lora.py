"""The embedded default with LoRA: the same tiny random InternVL and data, adapters (rank 16,
alpha 32) on every decoder projection and on the ViT, the projector trained as well.
A random-init base cannot learn through adapters alone as fast as a full fine-tune, so it gets
more steps and a higher learning rate.

    python -m mmjax.train --config=configs/tiny_lora.py
"""

from mmjax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "tiny")
    c.name = "tiny_lora"
    c.lora.llm_rank = 16
    c.lora.vit_rank = 16
    c.lora.dropout = 0.0
    c.freeze.mlp = False
    c.optim.lr = 5e-3
    c.num_epochs = c.num_epochs * 2
    return c
