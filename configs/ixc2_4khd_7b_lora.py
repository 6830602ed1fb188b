"""ixc2_4khd_7b with LoRA as the upstream `finetune_lora.sh`: r 64, alpha 64, dropout 0.05 on
attention.wqkv / attention.wo / feed_forward.w1, w2, w3, lr 5e-5, ViT and sampler frozen. The PEFT
adapter lands in <workdir>/hf_adapter/, the merged model in <workdir>/hf/."""

from mmjax.config import sibling_config, xcomposer2_lora


def get_config():
    return xcomposer2_lora(sibling_config(__file__, "ixc2_4khd_7b"))
