"""The embedded default's data: pictures of coloured shapes, with questions only the image answers.

Each image holds 1-3 shapes (circles, squares or triangles) of one colour, all in the left or all
in the right half, on a canvas of one of several sizes and aspect ratios (so dynamic tiling is
exercised). Questions ask for the colour, the count or the side; the answer is one word. A
text-only model cannot beat the per-question chance level (1/4, 1/3, 1/2), so held-out accuracy
above 90% shows the image path works end to end. Written as InternVL meta JSON + JSONL, the format users bring.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
KINDS = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
SIDES = ("left", "right")
CANVASES = ((112, 112), (168, 112), (112, 168), (224, 112), (140, 140), (112, 56), (56, 112), (84, 84))
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "count": "How many shapes are there?",
    "side": "Are the shapes on the left or on the right?",
}
FORMAT_VERSION = 4


def _draw(rng: random.Random) -> tuple[Image.Image, dict]:
    w, h = rng.choice(CANVASES)
    colour, kind = rng.choice(sorted(COLOURS)), rng.choice(KINDS)
    count, side = rng.randint(1, 3), rng.choice(SIDES)
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    # shapes stacked vertically in one half, each in its own cell, so they never overlap; one size
    # per canvas whatever the count (more shapes = more colour), large enough to cover several
    # ViT patches even in the 56 px thumbnail
    r = max(5, int(min(w // 2, h // 3) * 0.42))
    x0, x1 = (0, w // 2) if side == "left" else (w // 2, w)
    for k in range(count):
        cy = int((k + 0.5) * h / count)
        cx = (x0 + x1) // 2 + rng.randint(-max(1, (x1 - x0) // 8), max(1, (x1 - x0) // 8))
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[colour]
        if kind == "circle":
            d.ellipse(box, fill=fill)
        elif kind == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    answers = {"colour": colour, "kind": kind, "count": COUNTS[count - 1], "side": side}
    return img, answers


def generate_shapes_dataset(out_dir: str, num_train: int = 1200, num_eval: int = 200, seed: int = 0) -> dict:
    """Write images + ``train.jsonl`` / ``eval.jsonl`` + ``meta.json``; returns the paths.

    Idempotent: an existing complete dataset of the same version and sizes is reused.
    """
    out_dir = os.path.abspath(out_dir)   # meta.json names absolute paths: valid from any working directory
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    stamp = os.path.join(out_dir, "DONE.json")
    spec = {"version": FORMAT_VERSION, "num_train": num_train, "num_eval": num_eval, "seed": seed}
    paths = {"root": out_dir, "meta": os.path.join(out_dir, "meta.json"),
             "train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl")}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == spec:
                return paths
    rng = random.Random(seed)
    for split, n in (("train", num_train), ("eval", num_eval)):
        with open(paths[split], "w") as f:
            for i in range(n):
                img, answers = _draw(rng)
                name = f"images/{split}_{i:05d}.png"
                img.save(os.path.join(out_dir, name))
                if split == "train":
                    # two questions per image: more supervised tokens per tile the ViT runs on
                    kinds = rng.sample(sorted(QUESTIONS), 2)
                    conv = []
                    for j, q in enumerate(kinds):
                        conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + QUESTIONS[q]})
                        conv.append({"from": "gpt", "value": answers[q]})
                    f.write(json.dumps({"id": f"{split}-{i}", "image": name, "width": img.width,
                                        "height": img.height, "conversations": conv}) + "\n")
                else:
                    for q in sorted(QUESTIONS):
                        conv = [{"from": "human", "value": "<image>\n" + QUESTIONS[q]},
                                {"from": "gpt", "value": answers[q]}]
                        f.write(json.dumps({"id": f"{split}-{i}-{q}", "image": name, "question_type": q,
                                            "width": img.width, "height": img.height,
                                            "conversations": conv}) + "\n")
    meta = {"shapes_train": {"root": out_dir, "annotation": paths["train"], "data_augment": False,
                             "repeat_time": 1, "length": num_train}}
    with open(paths["meta"], "w") as f:
        json.dump(meta, f, indent=2)
    with open(stamp, "w") as f:
        json.dump(spec, f)
    return paths


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def build_tiny_tokenizer(out_dir: str, corpus: list[str], vocab_size: int = 384):
    """A small byte-level BPE tokenizer trained on ``corpus`` with chatml + InternVL special tokens.

    Saved as ``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer`` loads it like any
    checkpoint's tokenizer. Idempotent.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
