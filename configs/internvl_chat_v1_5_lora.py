"""internvl_chat_v1_5 with LoRA as upstream's `..._lora.sh` script for it: rank 16 on the LLM's upstream
target modules (alpha 32), everything else frozen, global batch 16 samples, grad accumulation 4.
The PEFT adapter lands in <workdir>/hf_adapter/, the merged model in <workdir>/hf/."""

from mmjax.config import lora_variant, sibling_config


def get_config():
    return lora_variant(sibling_config(__file__, "internvl_chat_v1_5"), grad_accum=4)
