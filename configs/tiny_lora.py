"""The embedded default with LoRA: the same tiny random InternVL and data, adapters on every
decoder projection (rank 64, alpha 128) and on the ViT (rank 32, alpha 64), the projector trained
as well; embeddings, norms, lm_head and the random base weights stay frozen. The base is random,
so the ranks are close to the layer widths: the adapters must carry everything the task needs.

    python -m mmjax.train --config=configs/tiny_lora.py
"""

from mmjax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "tiny")
    c.name = "tiny_lora"
    c.lora.llm_rank = 64
    c.lora.vit_rank = 32
    c.lora.dropout = 0.0
    # LoRA leaves lm_head and the final norm frozen (as upstream): the tiny base's 10x head
    # (configs/tiny.py) is what lets adapters alone reach confident answers
    c.freeze.mlp = False
    return c
