"""InternLM-XComposer2 samples (``data.template = 'ixc2'``): the IXC2 chat text, images as tile
tokens, and upstream's label rule.

Text (upstream ``conv2text``): each turn ``[UNUSED_TOKEN_146]user\\n{q}[UNUSED_TOKEN_145]\\n`` /
``[UNUSED_TOKEN_146]assistant\\n{a}[UNUSED_TOKEN_145]\\n`` (values stripped), then ``</s>`` once; no
system prompt (a system turn is refused). A record with one image and no placeholder gets it in
front of the whole text, so its tokens come before the BOS, as upstream's ``interleav_wrap``
prepends ``<ImageHere>``. The text is split at the image placeholders; every non-empty part is
tokenized on its own (the BOS on the first), as upstream does; an image's tokens follow the part
before it.

Image tokens are described by two per-token arrays (see :mod:`mmjax.models.xcomposer2`):
``image_token`` (-1 text, ``SUB_GN`` / ``GLB_GN`` a separator, ``FEATURES + t`` token ``t`` of a
tile) and ``image_tile`` (the tile within the sample, -1 otherwise; packing adds the sample's tile
offset in its row). ``input_ids`` hold ``pad_id`` there (never embedded, never a target).

Labels (upstream ``mask_human_targets``, on the id stream with images as -100): everything up to
and including the header after each user turn's ``<|im_end|>`` is masked, the assistant text and
its ``<|im_end|>`` are supervised, so are the final ``</s>`` (and the newline before it); what
follows the EOS is masked, and a text cut inside a user turn masks everything after the last
answer. Upstream masks a fixed 5 tokens after the user's ``<|im_end|>`` (the header's length in
InternLM2's tokenizer); mmjax masks the header's own token count in the tokenizer at hand, which
is the same for InternLM2 and right for any other. Everything is cut at ``max_length`` (an image
may be cut, as upstream).
"""

from __future__ import annotations

import numpy as np

from mmjax.data.batch import IGNORE_INDEX
from mmjax.data.templates import IMAGE_PLACEHOLDER

TEMPLATE = "ixc2"        # the data.template name of this family
IM_START, IM_END, EOS_TEXT = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]", "</s>"
TEXT = -1


def conversation_text(messages) -> str:
    """The IXC2 training text of ``messages`` ((role, text) pairs, user / assistant)."""
    out = []
    for role, value in messages:
        if role not in ("user", "assistant"):
            raise ValueError(f"XComposer2's template has no {role} turn")
        out.append(f"{IM_START}{role}\n{value.strip()}{IM_END}\n")
    return "".join(out) + EOS_TEXT


class XComposerTokens:
    """The tokenizer facts the IXC2 label rule needs (computed once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks {missing}: XComposer2 needs InternLM2's chat tokens")
        self.im_end = vocab[IM_END]
        self.eos = tokenizer.convert_tokens_to_ids(EOS_TEXT) if EOS_TEXT in vocab else tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("tokenizer has no </s> (end of sequence) token")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos)
        # the tokens after a user turn's <|im_end|> up to the answer: '\n<|im_start|>assistant\n'
        probe = tokenizer.encode(f"{IM_END}\n{IM_START}assistant\n", add_special_tokens=False)
        if not probe or probe[0] != self.im_end:
            raise ValueError(f"tokenizer does not keep {IM_END} as one token")
        self.header_len = len(probe) - 1

    def encode(self, text: str, bos: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=bos))


def tokenize(tok: XComposerTokens, text: str, image_tokens: list[tuple[np.ndarray, np.ndarray]]):
    """``text`` with one ``<image>`` per entry of ``image_tokens`` ((image_token, image_tile) arrays
    of that image) -> (input_ids, image_token, image_tile) int32 arrays, as upstream interleaves."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != len(image_tokens):
        raise ValueError(f"{len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders for {len(image_tokens)} images")
    ids, kinds, tiles, bos = [], [], [], True
    for k, part in enumerate(parts):
        if part:
            piece = tok.encode(part, bos)
            bos = False
            ids += piece
            kinds += [TEXT] * len(piece)
            tiles += [-1] * len(piece)
        if k < len(image_tokens):
            kind, tile = image_tokens[k]
            ids += [tok.pad_id] * len(kind)
            kinds += [int(x) for x in kind]
            tiles += [int(x) for x in tile]
    return (np.asarray(ids, np.int32), np.asarray(kinds, np.int32), np.asarray(tiles, np.int32))


def labels_for(tok: XComposerTokens, input_ids: np.ndarray, image_token: np.ndarray) -> np.ndarray:
    """Upstream's label rule (see the module docstring) over the id stream."""
    ids = np.where(image_token != TEXT, IGNORE_INDEX, input_ids)
    labels = ids.copy()
    last_answer_end, ends, eos_seen = 0, 0, False
    for i, t in enumerate(ids):
        if t == tok.im_end:
            if ends % 2 == 0:            # the end of a user turn: mask it and the assistant header
                labels[last_answer_end:i + 1 + tok.header_len] = IGNORE_INDEX
            else:                        # the end of an answer
                last_answer_end = i + 1
            ends += 1
        elif t == tok.eos:
            labels[i + 1:] = IGNORE_INDEX
            eos_seen = True
            break
    if not eos_seen and ends % 2 == 0:   # cut inside a user turn: nothing after the last answer
        labels[last_answer_end + 1:] = IGNORE_INDEX
    return labels.astype(np.int32)


def image_tiles(images, *, image_size: int, tokens_side: int, hd_num: int = -1, hd_variant: str = "4khd"):
    """RGB images -> (per image its (image_token, image_tile) arrays, tile numbers counted over all
    the images; per image its tiles; per image its HD grid (rows, cols), None for a plain tile)."""
    from mmjax.data import hd_images
    from mmjax.models.xcomposer2 import image_token_layout

    layouts, tiles, grids, first = [], [], [], 0
    for im in images:
        if hd_num > 0:
            t, grid = hd_images.hd_tiles(im, hd_num, image_size, hd_variant)
        else:
            t, grid = hd_images.plain_tile(im, image_size), None
        kind, tile = image_token_layout(grid, tokens_side)
        layouts.append((kind, np.where(tile >= 0, tile + first, -1)))
        tiles.append(t)
        grids.append(grid)
        first += len(t)
    return layouts, tiles, grids


def prompt(tok: XComposerTokens, question: str, images=(), *, image_size: int, tokens_side: int, hd_num: int = -1,
           hd_variant: str = "4khd"):
    """An inference prompt as training lays the text out: the user turn with ``question`` (a lone
    image without ``<ImageHere>`` before the whole text; several images at their ``<ImageHere>``
    placeholders, else in front of the question) and the assistant header. Returns (input_ids,
    image_token, image_tile) (1, T) int32 and the tiles (N, S, S, 3) (None without images)."""
    question = question.replace("<ImageHere>", IMAGE_PLACEHOLDER)
    text = f"{IM_START}user\n{question.strip()}{IM_END}\n{IM_START}assistant\n"
    if images and IMAGE_PLACEHOLDER not in question:
        text = IMAGE_PLACEHOLDER * len(images) + text
    layouts, tiles, _ = image_tiles(images, image_size=image_size, tokens_side=tokens_side, hd_num=hd_num,
                                    hd_variant=hd_variant)
    ids, kinds, tiles_of = tokenize(tok, text, layouts)
    return ids[None], kinds[None], tiles_of[None], (np.concatenate(tiles) if tiles else None)


def build_sample(cfg, tok: XComposerTokens, record, *, index: int = 0, source_id: int = 0):
    """A record -> (the processed sample dict (``mmjax.data.samples`` keys plus ``image_token`` /
    ``image_tile``), its ``SampleInfo``). ``cfg.hd_num`` -1: each image one ``image_size`` tile;
    > 0: the HD grid of ``image_size`` crops (``cfg.hd_variant`` '4khd' | '2.5'). Raises
    ``SampleError``."""
    import math

    from mmjax.data.samples import SampleError, SampleInfo, load_record_image

    if record.error:
        raise SampleError(record.error)
    if record.video is not None:
        raise SampleError("XComposer2 samples take images, not video")
    messages = list(record.messages)
    if messages and messages[0][0] == "system":
        raise SampleError("XComposer2's template has no system turn")
    if record.image_prepended:      # upstream puts a lone unplaced image before the whole text
        role, text = messages[0]
        messages[0] = (role, text[len(IMAGE_PLACEHOLDER) + 1:])
        text = IMAGE_PLACEHOLDER + conversation_text(messages)
    else:
        text = conversation_text(messages)
    size, hd_num = int(cfg.image_size), int(cfg.get("hd_num", -1))
    side = math.isqrt(int(cfg.num_image_token))
    images = [load_record_image(p, cfg.get("alpha", "white")) for p in record.images]
    layouts, pixel_chunks, grids = image_tiles(images, image_size=size, tokens_side=side, hd_num=hd_num,
                                               hd_variant=cfg.get("hd_variant", "4khd"))
    try:
        ids, kinds, tiles_of = tokenize(tok, text, layouts)
    except ValueError as e:
        raise SampleError(str(e)) from None
    labels = labels_for(tok, ids, kinds)
    max_len = int(cfg.max_length)
    truncated = len(ids) > max_len
    if truncated:       # as upstream: everything, image tokens included, cut at max_length
        ids, kinds, tiles_of, labels = ids[:max_len], kinds[:max_len], tiles_of[:max_len], labels[:max_len]
    pixel_values = (np.concatenate(pixel_chunks) if pixel_chunks else np.zeros((0, size, size, 3), np.float32))
    pixel_values = pixel_values[:int(tiles_of.max(initial=-1)) + 1]      # tiles some kept token reads
    n_sup = int(np.sum(labels != IGNORE_INDEX))
    if n_sup == 0:
        raise SampleError(f"too long after truncation: no supervised token within max_length={max_len}"
                          if truncated else "zero supervised tokens")
    info = SampleInfo([], list(record.images), [(1, 1) if g is None else (g[1], g[0]) for g in grids],  # (cols, rows)
                      [im.size for im in images], [len(t) for t in pixel_chunks], truncated)
    return {
        "input_ids": ids, "labels": labels, "image_token": kinds, "image_tile": tiles_of,
        "pixel_values": pixel_values.astype(np.float32, copy=False),
        "image_flags": np.ones(len(pixel_values), np.int32), "num_tiles": int(len(pixel_values)),
        "num_images": int(len(record.images)), "num_tokens": int(len(ids)), "num_supervised": n_sup,
        "source": record.source, "source_id": int(source_id), "index": int(index),
    }, info
