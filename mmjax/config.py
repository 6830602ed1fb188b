"""Training config defaults shared by every configs/<name>.py; each config file overrides what differs.

Mirrors the upstream InternVL 2nd-finetune scripts (see the reference notes): AdamW (0.9, 0.999,
1e-8) with decay on every trainable parameter, clip 1.0, cosine with 3% warmup, 1 epoch, bf16
compute with float32 master weights.
"""

import importlib.util
import os

import ml_collections


def sibling_config(config_file: str, name: str) -> ml_collections.ConfigDict:
    """``get_config()`` of ``<name>.py`` next to ``config_file``: how a config extends another
    (e.g. ``mini2b_lora.py`` = ``mini2b.py`` + LoRA) without configs being a package."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"mmjax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def base_config() -> ml_collections.ConfigDict:
    from mmjax.data.config import default_data_config
    from mmjax.sharding import rules_as_config

    c = ml_collections.ConfigDict()
    c.name = "base"
    c.model_path = ""            # HF checkpoint directory (InternVL-Chat, transformers InternVL, causal LM)
    c.tokenizer_path = ""        # defaults to model_path
    c.synthetic = ml_collections.ConfigDict({"enabled": False,      # the embedded default builds its own
                                             "head_init_scale": 1.0})  # x init std of its random lm_head
    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"        # compute dtype
    c.model.param_dtype = "float32"   # master weights
    c.model.frozen_param_dtype = "float32"  # storage of frozen weights ("bfloat16" halves their memory)
    c.model.drop_path_rate = 0.0
    c.model.plora_dropout = 0.05      # XComposer2's partial-LoRA input dropout while training (upstream's)
    c.model.remat = "full"            # none | full | dots | dots_saveable
    # a backend of mmjax.models.attention: xla | blockwise (memory linear in T, the default on every
    # platform: measured) | pallas_gpu (JAX's Triton flash kernel) | splash (TPU); the last two take
    # the packed rows' segment ids, run per shard on a mesh, and are unmeasured on hardware so far
    c.model.attention = "blockwise"
    # blockwise tile bound; blocks with no visible key are skipped. 256 against 512, measured with
    # bench/compare_torch.py: 8192-token packed rows 43.2 vs 50.6 s a step (fewer diagonal and
    # cross-sample tiles), 4 x 1024-token rows 34.7 vs 35.1 s
    c.model.attention_block = 256
    # decoder layers run their per-token work (norms, projections, MLP) in chunks of this many
    # tokens and skip the chunks of a batch that hold only padding; for padding-heavy batches
    # (packing "none"). 0: the whole row at once. Measured on full packed rows (bench/compare_torch.py
    # (b), 8192-token rows): 1024 cost 7 % a step and 1.4 GiB, and saved 17 % on a row 40 % full
    c.model.token_chunk = 0
    # the ViT's backend over its 1,025-token tiles. blockwise with one block a tile keeps no
    # (tiles, heads, 1025, 1025) scores for the backward pass (xla keeps them: ~0.2 GiB a layer
    # for 8 tiles) at the price of recomputing them
    c.model.vit_attention = "blockwise"
    c.model.vit_attention_block = 0   # 0: a whole tile in one block
    # tiles per ViT call in training, real tiles first: a packed batch's empty tile slots (its tile
    # budget minus the tiles its samples hold) are skipped in groups of this many, not encoded.
    # 0 (or a budget of at most one group): one call over every slot
    c.model.vit_tile_chunk = 8
    c.model.img_context_token_id = -1  # -1: the tokenizer's <IMG_CONTEXT> (set only to plan without a tokenizer)

    c.freeze = ml_collections.ConfigDict()
    c.freeze.backbone = True          # InternViT
    c.freeze.mlp = False              # projector mlp1
    c.freeze.llm = False
    c.freeze.unfreeze_vit_layers = 0  # last k ViT layers trainable even when the backbone is frozen

    c.lora = ml_collections.ConfigDict()
    c.lora.llm_rank = 0
    c.lora.vit_rank = 0
    c.lora.alpha_ratio = 2.0          # alpha = ratio * rank (upstream: 2 x rank)
    c.lora.dropout = 0.05
    c.lora.llm_targets = ()           # empty = the family's upstream target list
    c.lora.vit_targets = ("qkv", "proj", "fc1", "fc2")

    c.data = default_data_config()
    c.data.template = ""              # empty: the checkpoint's own (config.json `template`)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 4e-5
    c.optim.schedule = "cosine"       # cosine | constant (both after the linear warmup)
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.warmup_ratio = 0.03
    c.optim.min_lr_ratio = 0.0
    c.optim.no_decay = ()             # regexes over parameter paths exempt from weight decay

    c.grad_accum = 1                  # micro-batches per step (data.batch_size % grad_accum == 0)
    c.num_epochs = 1
    c.total_steps = -1                # > 0 caps the run; -1 (unset): num_epochs over the data; 0 or < -1 refused
    c.loss_chunk_size = 1024          # tokens per cross-entropy chunk
    c.max_nonfinite_steps = 5         # consecutive skipped (NaN/inf) updates that stop the run

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    # logical axis -> mesh axes for parameters and activations (mmjax.sharding.LOGICAL_RULES):
    # comma-separated axes, '' replicates; e.g. --config.mesh.rules.vocab=fsdp
    c.mesh.rules = ml_collections.ConfigDict(rules_as_config())

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 1
    c.checkpoint.async_save = True

    # a restart resumes the workdir's newest intact checkpoint; a change of what the run means
    # (model, trainable set, LoRA, data, seed) is refused unless named here: comma-separated keys or
    # sections, e.g. --config.resume.allow_changes=data.meta_path,seed (mmjax/train/resume.py)
    c.resume = ml_collections.ConfigDict({"allow_changes": ""})

    c.log_every = 1
    c.export = ml_collections.ConfigDict({"hf": True, "dtype": "bfloat16"})
    # held-out VQA after training: InternVL JSONL (answer = the gpt turn), images under `root`
    c.eval = ml_collections.ConfigDict({"enabled": False, "annotation": "", "root": "", "max_new_tokens": 8,
                                        "num_samples": 0})
    c.peak_flops_per_device = 0.0     # 0 = look up by device kind (unknown: MFU not reported)
    return c


def second_finetune(name: str, model_path: str, template: str, *, lr: float, weight_decay: float,
                    drop_path_rate: float, max_length: int = 4096, grad_accum: int = 4) -> ml_collections.ConfigDict:
    """Upstream's 2nd-finetune recipe (full fine-tune, frozen ViT, 12 tiles + thumbnail, 1 epoch,
    global batch 128 samples of up to ``max_length`` tokens). mmjax packs: 32 rows of 16k tokens
    hold as many tokens as 128 samples of 4k."""
    c = base_config()
    c.name = name
    c.model_path = model_path
    c.model.drop_path_rate = drop_path_rate
    c.freeze.backbone = True
    c.optim.lr = lr
    c.optim.weight_decay = weight_decay
    c.data.template = template
    c.data.max_length = max_length
    c.data.max_dynamic_patch = 12
    c.data.min_num_frame, c.data.max_num_frame = 8, 32   # upstream's video frame range in training
    c.data.pack_max_length = 16384
    c.data.max_tiles_per_pack = 64
    c.data.batch_size = 32
    c.grad_accum = grad_accum
    return c


def xcomposer2_finetune(name: str, model_path: str, *, img_size: int, hd_num: int, hd_variant: str = "4khd",
                        max_length: int, samples_per_step: int, fix_vit: bool = False) -> ml_collections.ConfigDict:
    """InternLM-XComposer2's fine-tune scripts (full): AdamW lr 1e-5, weight decay 0.1, beta2 0.95,
    1 % warmup then cosine, 1 epoch, ``max_length`` tokens a sample (image tokens included),
    ``fix_vit`` as the script sets it, the sampler (``vision_proj`` + separators) trained. Upstream
    pads one conversation per item; mmjax packs rows of ``max_length`` tokens, as many per step as
    the script's samples would fill at half its length on average."""
    from mmjax.data.xcomposer import TEMPLATE as XCOMPOSER_TEMPLATE
    c = base_config()
    c.name = name
    c.model_path = model_path
    c.freeze.backbone = fix_vit
    c.freeze.mlp = False
    c.optim.lr = 1e-5
    c.optim.weight_decay = 0.1
    c.optim.b2 = 0.95
    c.optim.warmup_ratio = 0.01
    c.optim.schedule = "cosine"
    c.data.template = XCOMPOSER_TEMPLATE
    c.data.image_size = img_size
    c.data.hd_num = hd_num
    c.data.hd_variant = hd_variant
    # tokens a tile gives with CLIP ViT-L/14: its patch grid, 2 x 2 merged for the HD variants
    c.data.num_image_token = (img_size // 28) ** 2 if hd_num > 0 else (img_size // 14) ** 2
    c.data.max_length = max_length
    c.data.pack_max_length = max_length
    tiles = 2 * (hd_num + 1) if hd_num > 0 else 8       # two HD images (crops + global view) a row
    c.data.max_tiles_per_pack = tiles
    c.data.batch_size = max(1, samples_per_step // 2)
    c.grad_accum = 4 if c.data.batch_size % 4 == 0 else 1
    return c


def xcomposer2_lora(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The LoRA script on top of :func:`xcomposer2_finetune`: r 64, alpha 64, dropout 0.05 on
    ``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``; lr 5e-5; ``fix_vit`` and
    ``fix_sampler`` (upstream's name-substring rule would also train the separators and save the
    frozen PLoRA weights; mmjax trains and saves the adapters only)."""
    c.name = c.name + "_lora"
    c.lora.llm_rank = 64
    c.lora.alpha_ratio = 1.0
    c.lora.dropout = 0.05
    c.lora.llm_targets = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    c.optim.lr = 5e-5
    c.freeze.backbone = c.freeze.mlp = c.freeze.llm = True
    c.model.frozen_param_dtype = "bfloat16"
    return c


def lora_variant(c: ml_collections.ConfigDict, *, rank: int = 16, grad_accum: int = 2) -> ml_collections.ConfigDict:
    """Upstream's LoRA scripts on top of a 2nd-finetune config: rank r on the LLM (alpha 2r),
    ViT / MLP / LLM base frozen (base stored in bf16), no drop path, global batch 16 samples."""
    c.name = c.name + "_lora"
    c.lora.llm_rank = rank
    c.freeze.backbone = c.freeze.mlp = c.freeze.llm = True
    c.model.drop_path_rate = 0.0
    c.model.frozen_param_dtype = "bfloat16"
    c.data.batch_size = 4
    c.grad_accum = grad_accum
    return c
