"""Held-out question answering: greedy answers compared with the reference answer.

Prompts are left-padded to one length and tiles padded to one count per batch, so the decoder
compiles once for the whole evaluation.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax.data.prompts import build_prompt, end_token_id, settings_for


def _normalize(text: str) -> str:
    return text.strip().strip(".").lower()


def evaluate_vqa(model, tokenizer, cfg, batch_size: int = 50) -> float:
    """Exact-match accuracy of greedy answers on ``cfg.eval.annotation`` (InternVL JSONL, one
    question per record, answer = the gpt turn)."""
    template = cfg.data.template
    records = []
    with open(cfg.eval.annotation) as f:
        for line in f:
            records.append(json.loads(line))
    if cfg.eval.get("num_samples", 0):
        records = records[: cfg.eval.num_samples]
    settings = settings_for(model, cfg.data.max_dynamic_patch)
    prompts = []
    for r in records:
        image = Image.open(os.path.join(cfg.eval.root, r["image"]))
        q = r["conversations"][0]["value"]
        ids, pv, flags = build_prompt(tokenizer, template, q, [image], num_image_token=model.cfg.num_image_token,
                                      settings=settings, system_message=cfg.data.get("system_message") or None)
        prompts.append((ids[0], pv, r["conversations"][1]["value"]))
    max_len = max(len(p[0]) for p in prompts)
    max_tiles = max(p[1].shape[0] for p in prompts)
    pad_id = tokenizer.pad_token_id or 0
    eos = end_token_id(tokenizer, template)
    correct = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        ids = np.full((batch_size, max_len), pad_id, np.int32)
        mask = np.zeros((batch_size, max_len), np.int32)
        size = chunk[0][1].shape[1]
        pv = np.zeros((batch_size * max_tiles, size, size, 3), np.float32)
        flags = np.zeros((batch_size * max_tiles,), np.int32)
        t = 0
        for i, (p_ids, p_pv, _) in enumerate(chunk):
            ids[i, max_len - len(p_ids):] = p_ids          # left padding
            mask[i, max_len - len(p_ids):] = 1
            pv[t:t + p_pv.shape[0]] = p_pv
            flags[t:t + p_pv.shape[0]] = 1
            t += p_pv.shape[0]
        out, lengths = model.generate(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                      pixel_values=jnp.asarray(pv), image_flags=jnp.asarray(flags),
                                      max_new_tokens=cfg.eval.max_new_tokens, eos_token_ids=[eos],
                                      pad_token_id=pad_id)
        out, lengths = np.asarray(out), np.asarray(lengths)
        for i in range(n):
            text = tokenizer.decode(out[i, :lengths[i]].tolist(), skip_special_tokens=True)
            correct += int(_normalize(text) == _normalize(chunk[i][2]))
    return correct / max(len(prompts), 1)
