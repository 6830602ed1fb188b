"""Prompts as the model sees them at inference: the chat template's user turn and assistant
header, InternVL dynamic tiling of the images, and the template's end token.

Used by ``python -m mmjax.chat`` and by the trainer's held-out evaluation, so both ask exactly
what upstream's ``model.chat`` asks.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    image_size: int = 448
    min_num: int = 1
    max_num: int = 12
    use_thumbnail: bool = True
    normalize_type: str = "imagenet"


def settings_for(model, max_num: int | None = None) -> ImageSettings:
    """Tiling settings of an InternVL model (its ViT input size; upstream config's patch budget)."""
    raw = model.cfg.raw
    return ImageSettings(image_size=int(model.cfg.vision.image_size),
                         min_num=int(raw.get("min_dynamic_patch", 1)),
                         max_num=int(max_num or raw.get("max_dynamic_patch", 12)),
                         use_thumbnail=bool(raw.get("use_thumbnail", True)))


def build_prompt(tokenizer, template: str, question: str, images=(), *, num_image_token: int,
                 settings: ImageSettings = ImageSettings(), system_message: str | None = None):
    """(input_ids (1, T) int32, pixel_values (tiles, H, W, 3) | None, image_flags (tiles,) | None).

    As upstream's ``model.chat``: a single image without a placeholder gets ``<image>\\n`` in front
    of the question; several images get ``Image-k: <image>`` lines."""
    from mmjax.data import images as img_lib
    from mmjax.data.templates import EMPTY_THINK, Segment, TokenizeContext, get_template, render_segments, tokenize_segments

    tpl = get_template(template)
    if images and "<image>" not in question:
        if len(images) == 1:
            question = "<image>\n" + question
        else:
            question = "".join(f"Image-{k + 1}: <image>\n" for k in range(len(images))) + question
    tiles, counts = [], []
    budget = settings.max_num if len(images) <= 1 else max(1, settings.max_num // len(images))
    for im in images:
        pv, _ = img_lib.process_image(img_lib.to_rgb(im), min_num=settings.min_num, max_num=budget,
                                      image_size=settings.image_size, use_thumbnail=settings.use_thumbnail,
                                      normalize_type=settings.normalize_type)
        tiles.append(pv)
        counts.append(pv.shape[0])
    segs = render_segments(tpl, [("user", question)], system_message)
    header = tpl.assistant_prefix + (EMPTY_THINK if tpl.qwen3_think else "")
    segs.append(Segment(header, False))
    ids, _ = tokenize_segments(TokenizeContext(tokenizer, num_image_token), segs, counts)
    if not tiles:
        return ids[None], None, None
    pv = np.concatenate(tiles)
    return ids[None], pv, np.ones((pv.shape[0],), np.int32)


def end_token_id(tokenizer, template: str) -> int:
    from mmjax.data.templates import get_template
    return int(tokenizer.convert_tokens_to_ids(get_template(template).end))
