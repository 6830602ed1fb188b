"""The embedded default (``configs/tiny.py``): what it generates under the run directory, and only
what the config does not name.

    assets/data/   pictures of shapes + InternVL meta JSON / JSONL (``synthetic.generate_shapes_dataset``)
    assets/init/   a small byte-level BPE tokenizer and a random tiny InternVL in the upstream
                   InternVL-Chat layout (config.json + model.safetensors), loaded by training with
                   ``mmjax.from_pretrained`` exactly as a user's Mini-InternVL-Chat checkpoint

A setting the user gives is never replaced: an explicit ``model_path`` is trained instead of the
random checkpoint; an explicit data source (``data.meta_path`` / ``data_txt`` / ``datasets``) is
trained (and checked) instead of the shapes data; an explicit ``eval.annotation`` is evaluated.
:func:`prepare_embedded` returns the lines that say which is which, for the start-up summary.
"""

from __future__ import annotations

import json
import os
import shutil

from mmjax.data.synthetic import QUESTIONS, build_tiny_tokenizer, generate_shapes_dataset


def user_data_sources(data_cfg) -> list[str]:
    """The data-source keys the config sets (``meta_path``, ``data_txt``, ``datasets``, ``datasets_json``)."""
    return [k for k in ("meta_path", "data_txt", "datasets", "datasets_json") if data_cfg.get(k)]


def prepare_embedded(cfg, workdir: str) -> list[str]:
    """Generate the embedded default's missing assets under ``workdir/assets`` and point the config
    at them (in place); returns one line per decision, for the start-up summary."""
    assets = os.path.join(workdir, "assets")
    sources = user_data_sources(cfg.data)
    eval_cfg = cfg.get("eval")
    wants_eval = bool(eval_cfg and eval_cfg.get("enabled"))
    user_eval = bool(eval_cfg and eval_cfg.get("annotation"))
    notes = []
    paths = None
    # the shapes data is the training data unless the user names some, and the tokenizer's corpus
    # whenever the random checkpoint is generated
    if not sources or not cfg.model_path or (wants_eval and not user_eval and not sources):
        paths = generate_shapes_dataset(os.path.join(assets, "data"), cfg.synthetic.num_train,
                                        cfg.synthetic.num_eval, seed=cfg.seed)
    with cfg.unlocked():
        if cfg.model_path:
            notes.append(f"model: yours ({cfg.model_path})")
        else:
            cfg.model_path = build_tiny_checkpoint(cfg, os.path.join(assets, "init"), paths)
            notes.append(f"model: the embedded random InternVL, generated in {cfg.model_path}")
        if sources:
            notes.append("data: yours (" + ", ".join(f"data.{k}" for k in sources) + ")")
        else:
            cfg.data.meta_path = paths["meta"]
            notes.append(f"data: the embedded shapes task, generated in {paths['root']}")
        if wants_eval and not user_eval:
            if sources:
                # the held-out shapes questions measure the shapes task, not the user's data
                cfg.eval.enabled = False
                notes.append("eval: off (the embedded held-out set belongs to the generated data; "
                             "set eval.annotation and eval.root to evaluate yours)")
            else:
                cfg.eval.annotation, cfg.eval.root = paths["eval"], paths["root"]
    return notes


def upstream_config(cfg, vocab_size: int, template: str) -> dict:
    """An ``internvl_chat`` config.json for the sizes in ``cfg.synthetic``."""
    v, l = dict(cfg.synthetic.vision), dict(cfg.synthetic.llm)
    head_dim = l["hidden_size"] // l["num_attention_heads"]
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": template,
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "force_image_size": v["image_size"],
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": int(cfg.data.max_dynamic_patch),
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "vision_config": {"model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "num_channels": 3,
                          "hidden_act": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
                          "initializer_range": 0.02, **v},
        "llm_config": {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
                       "vocab_size": vocab_size, "bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
                       "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                       "head_dim": head_dim, "rope_scaling": None, **l},
    }


def build_tiny_checkpoint(cfg, out_dir: str, data_paths: dict) -> str:
    """Create (once) the tokenizer, trained on the shapes data's text, and the random checkpoint;
    returns the checkpoint directory."""
    import jax.numpy as jnp
    from flax import nnx

    import mmjax
    from mmjax.data.templates import get_template
    from mmjax.models.internvl import InternVL, InternVLConfig

    template = cfg.data.template
    # what the checkpoint is made from: a change of sizes, seed or template makes a new one
    spec = json.dumps({"vision": dict(cfg.synthetic.vision), "llm": dict(cfg.synthetic.llm), "seed": cfg.seed,
                       "template": template, "head_init_scale": float(cfg.synthetic.get("head_init_scale", 1.0)),
                       "max_dynamic_patch": int(cfg.data.max_dynamic_patch),
                       "system_message": cfg.data.get("system_message") or ""}, sort_keys=True)
    done = os.path.join(out_dir, "DONE")
    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(done):
        with open(done) as f:
            if f.read() == spec:
                return out_dir
        shutil.rmtree(out_dir)   # made from another spec: regenerate it (tokenizer included)
    os.makedirs(out_dir, exist_ok=True)
    corpus = []
    for split in ("train", "eval"):
        with open(data_paths[split]) as f:
            for line in f:
                for turn in json.loads(line)["conversations"]:
                    corpus.append(turn["value"].replace("<image>", ""))
    tpl = get_template(template)
    corpus += [cfg.data.get("system_message") or tpl.default_system or ""] * 50 + list(QUESTIONS.values()) * 50
    tokenizer = build_tiny_tokenizer(out_dir, corpus)

    hf_config = upstream_config(cfg, len(tokenizer), template)
    icfg = InternVLConfig.from_internvl_chat(hf_config, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = InternVL(icfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
    head_scale = float(cfg.synthetic.get("head_init_scale", 1.0))
    if head_scale != 1.0:
        # a frozen random output head bounds the logits (the final RMSNorm fixes |h|): a base that
        # only LoRA will adapt needs a head able to express confident answers
        head = model.language_model.lm_head
        head.set_value(head[...] * head_scale)
    mmjax.save_pretrained(model, out_dir, layout="internvl_chat", hf_config=hf_config)
    with open(done, "w") as f:
        f.write(spec)
    return out_dir
