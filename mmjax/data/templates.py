"""Chat templates as labelled segments, and segment-by-segment tokenization with label masks.

A conversation is rendered into a list of ``Segment(text, supervised)``; only assistant answers and their
end token are supervised. Tokenization happens segment by segment, so every label boundary is a token
boundary by construction (no offsets into a re-tokenized string). ``<image>`` placeholders inside user text
are replaced by ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token * tiles) + ``</img>`` as token ids.

Templates (names as upstream ``--conv_style``):

* ``internlm2-chat``: ``<|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|><|im_start|>assistant\\n{A}<|im_end|>``
  (no newline after ``<|im_end|>``; message values stripped, as upstream ``preprocess_internlm``).
* ``phi3-chat``: ``<|system|>\\n{SYS}<|end|><|user|>\\n{Q}<|end|><|assistant|>\\n{A}<|end|>``.
* ``internvl2_5``: chatml, ``<|im_start|>{role}\\n{v}<|im_end|>\\n`` per turn with a system turn; an optional
  first ``system`` message replaces the default system prompt.
* ``intern-s1`` / ``internvl-3.5`` (XTuner v1's names): the ``internvl2_5`` layout with Intern-S1's / InternVL's
  default system prompt and no think block.
* ``qwen3``: chatml without a default system prompt (as Qwen3's own chat template). Decision on the empty
  think block: Qwen3's chat template renders assistant turns *after the last user turn* as
  ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{answer}`` when the answer has no reasoning, and strips
  ``<think>..</think>`` reasoning from earlier assistant turns. mmjax renders exactly that (so the text matches
  ``apply_chat_template``), and treats the empty think block as part of the prompt (not supervised): it is what
  the model is given at inference with ``enable_thinking=False``. An answer that carries its own
  ``<think>...</think>`` in the last turn is supervised whole, reasoning included.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.batch import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"

INTERNLM2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")
INTERNVL2_5_SYSTEM = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                      "多模态大语言模型。")

INTERN_S1_SYSTEM = "你是书生大模型，英文名是Intern-S1，是由上海人工智能实验室开发的多模态大语言模型。"


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    system_prefix: str      # before the system message
    user_prefix: str
    assistant_prefix: str
    end: str                # end token, supervised after each answer
    after_end: str          # text after the end token (e.g. '\n' in chatml), never supervised
    default_system: str | None
    strip_values: bool = False
    qwen3_think: bool = False


TEMPLATES = {
    "internlm2-chat": Template("internlm2-chat", "<|im_start|>system\n", "<|im_start|>user\n",
                               "<|im_start|>assistant\n", "<|im_end|>", "", INTERNLM2_SYSTEM, strip_values=True),
    "phi3-chat": Template("phi3-chat", "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", "",
                          INTERNLM2_SYSTEM),
    "internvl2_5": Template("internvl2_5", "<|im_start|>system\n", "<|im_start|>user\n",
                            "<|im_start|>assistant\n", "<|im_end|>", "\n", INTERNVL2_5_SYSTEM),
    "qwen3": Template("qwen3", "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
                      "<|im_end|>", "\n", None, qwen3_think=True),
    # XTuner v1's templates of the same names: chatml with a default system prompt, no think block
    "intern-s1": Template("intern-s1", "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n",
                          "<|im_end|>", "\n", INTERN_S1_SYSTEM),
    "internvl-3.5": Template("internvl-3.5", "<|im_start|>system\n", "<|im_start|>user\n",
                             "<|im_start|>assistant\n", "<|im_end|>", "\n", INTERNVL2_5_SYSTEM),
}

EMPTY_THINK = "<think>\n\n</think>\n\n"


def get_template(name):
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def resolve_template(data_cfg, checkpoint_config: dict | None, where: str = "the checkpoint") -> str:
    """Fill an empty ``data.template`` with the checkpoint's own (``template`` in an InternVL-Chat
    config.json), in place; returns a line saying where the template came from. An explicit
    ``data.template`` always wins."""
    if data_cfg.template:
        return f"template: {data_cfg.template} (data.template)"
    name = (checkpoint_config or {}).get("template")
    if not name:
        raise ValueError(f"data.template is empty and {where} names no chat template: set data.template "
                         f"to one of {sorted(TEMPLATES)}")
    if name not in TEMPLATES:
        raise ValueError(f"{where} names the chat template {name!r}, which mmjax does not have; set "
                         f"data.template to one of {sorted(TEMPLATES)}")
    with data_cfg.unlocked():
        data_cfg.template = name
    return f"template: {name} (from {where})"


@dataclasses.dataclass
class Segment:
    text: str
    supervised: bool


def render_segments(template, messages, system_message=None):
    """messages: list of (role, text) with roles system/user/assistant (system only first).

    Returns a list of Segments. The system prompt: a leading system message, else ``system_message``,
    else the template's default (none for qwen3).
    """
    t = get_template(template) if isinstance(template, str) else template
    msgs = list(messages)
    system = system_message if system_message else t.default_system
    if msgs and msgs[0][0] == "system":
        system = msgs[0][1]
        msgs = msgs[1:]
    val = (lambda s: s.strip()) if t.strip_values else (lambda s: s)
    segs = []
    if system is not None:
        segs.append(Segment(t.system_prefix + val(system) + t.end + t.after_end, False))
    last_user = max([k for k, (r, _) in enumerate(msgs) if r == "user"], default=-1)
    for k, (role, text) in enumerate(msgs):
        if role == "user":
            segs.append(Segment(t.user_prefix + val(text) + t.end + t.after_end, False))
        elif role == "assistant":
            header = t.assistant_prefix
            answer = val(text)
            if t.qwen3_think:
                if k > last_user:
                    if "<think>" not in answer:
                        header += EMPTY_THINK
                elif "</think>" in answer:  # history: reasoning stripped as Qwen3's template does
                    answer = answer.split("</think>")[-1].lstrip("\n")
            segs.append(Segment(header, False))
            segs.append(Segment(answer + t.end, True))
            if t.after_end:
                segs.append(Segment(t.after_end, False))
        else:
            raise ValueError(f"unknown role {role!r}")
    return segs


def render_text(template, messages, system_message=None):
    return "".join(s.text for s in render_segments(template, messages, system_message))


class TokenizeContext:
    """Per-tokenizer facts needed for segment tokenization (computed once)."""

    def __init__(self, tokenizer, num_image_token=256):
        from mmjax.data.tokenizer import image_token_ids
        self.tokenizer = tokenizer
        self.num_image_token = int(num_image_token)
        self.img_start, self.img_end, self.img_context = image_token_ids(tokenizer)
        if None in (self.img_start, self.img_end, self.img_context):
            raise ValueError("tokenizer lacks <img>/</img>/<IMG_CONTEXT>; call mmjax.data.ensure_internvl_tokens")
        plain = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a", add_special_tokens=True)
        # tokens the tokenizer adds around a text (BOS for Llama / InternLM2 sentencepiece tokenizers)
        self.prefix_ids = full[:len(full) - len(plain)] if full[-len(plain):] == plain else []
        # sentencepiece-style tokenizers add a dummy prefix to every separately encoded text; continuation
        # segments are then encoded after an anchor special token whose ids are dropped.
        self.anchor = "<img>"
        anchored = tokenizer.encode(self.anchor + "a", add_special_tokens=False)
        self.needs_anchor = anchored[1:] != plain
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))

    def encode(self, text, first):
        if not text:
            return []
        if first or not self.needs_anchor:
            return self.tokenizer.encode(text, add_special_tokens=False)
        ids = self.tokenizer.encode(self.anchor + text, add_special_tokens=False)
        assert ids[0] == self.img_start, "anchor token was merged with the following text"
        return ids[1:]


def image_block_ids(ctx, tiles):
    return [ctx.img_start] + [ctx.img_context] * (ctx.num_image_token * tiles) + [ctx.img_end]


def image_block_text(ctx, tiles):
    return "<img>" + "<IMG_CONTEXT>" * (ctx.num_image_token * tiles) + "</img>"


def tokenize_segments(ctx, segments, tiles_per_image):
    """Segments -> (input_ids int32, labels int32). ``<image>`` in unsupervised segments consumes
    ``tiles_per_image`` in order. Raises ValueError if the placeholder count differs from the image count."""
    ids, labels = list(ctx.prefix_ids), [IGNORE_INDEX] * len(ctx.prefix_ids)
    img = 0
    for seg in segments:
        pieces = seg.text.split(IMAGE_PLACEHOLDER) if not seg.supervised else [seg.text]
        for p, piece in enumerate(pieces):
            if p > 0:
                if img >= len(tiles_per_image):
                    raise ValueError(f"more {IMAGE_PLACEHOLDER} placeholders than images ({len(tiles_per_image)})")
                block = image_block_ids(ctx, tiles_per_image[img])
                img += 1
                ids += block
                labels += [IGNORE_INDEX] * len(block)
            piece_ids = ctx.encode(piece, first=(len(ids) == len(ctx.prefix_ids)))
            ids += piece_ids
            labels += piece_ids if seg.supervised else [IGNORE_INDEX] * len(piece_ids)
    if img != len(tiles_per_image):
        raise ValueError(f"{img} {IMAGE_PLACEHOLDER} placeholders for {len(tiles_per_image)} images")
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def whole_text(ctx, segments, tiles_per_image):
    """The rendered conversation with image blocks expanded (what a whole-string tokenization would see)."""
    text = "".join(s.text for s in segments)
    for n in tiles_per_image:
        text = text.replace(IMAGE_PLACEHOLDER, image_block_text(ctx, n), 1)
    return text


def matches_whole_tokenization(ctx, segments, tiles_per_image, input_ids):
    """True if the segment-wise ids equal tokenizing the whole rendered string at once."""
    whole = list(ctx.prefix_ids) + ctx.tokenizer.encode(whole_text(ctx, segments, tiles_per_image),
                                                       add_special_tokens=False)
    return whole == [int(x) for x in input_ids]


def chat_template_text(tokenizer, messages):
    """Render ``messages`` with the tokenizer's own chat template (None when it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    conv = [{"role": r, "content": c} for r, c in messages]
    return tokenizer.apply_chat_template(conv, tokenize=False)


def supervised_spans(input_ids, labels):
    """List of (start, end) index ranges where labels != IGNORE_INDEX."""
    sup = np.asarray(labels) != IGNORE_INDEX
    spans, start = [], None
    for k, s in enumerate(sup):
        if s and start is None:
            start = k
        elif not s and start is not None:
            spans.append((start, k))
            start = None
    if start is not None:
        spans.append((start, len(sup)))
    return spans
