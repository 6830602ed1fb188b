"""Ask a model about images: prompt building (the checkpoint's chat template, InternVL dynamic
tiling) and KV-cached decoding. Also the CLI:

    python -m mmjax.chat --model=DIR --image=IMG --prompt="Describe the image."
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
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


def answer(model, tokenizer, template: str, question: str, images=(), *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
           settings: ImageSettings | None = None, system_message: str | None = None) -> str:
    """The model's reply (decoded, special tokens skipped), greedy unless ``temperature > 0``."""
    settings = settings or settings_for(model)
    ids, pv, flags = build_prompt(tokenizer, template, question, images, num_image_token=model.cfg.num_image_token,
                                  settings=settings, system_message=system_message)
    out, lengths = model.generate(jnp.asarray(ids), pixel_values=None if pv is None else jnp.asarray(pv),
                                  image_flags=None if flags is None else jnp.asarray(flags),
                                  max_new_tokens=max_new_tokens, eos_token_ids=[end_token_id(tokenizer, template)],
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  rng=jax.random.PRNGKey(seed), pad_token_id=tokenizer.pad_token_id or 0)
    n = int(lengths[0])
    return tokenizer.decode(np.asarray(out[0, :n]).tolist(), skip_special_tokens=True).strip()


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("model", None, "HF checkpoint directory (InternVL layouts).", required=True)
    flags.DEFINE_multi_string("image", [], "Image file(s).")
    flags.DEFINE_string("prompt", "Describe the image in detail.", "The question.")
    flags.DEFINE_string("template", None, "Chat template; default: the checkpoint's.")
    flags.DEFINE_string("dtype", "bfloat16", "float32 | bfloat16")
    flags.DEFINE_integer("max_num", None, "Max tiles per image (default: the checkpoint's, else 12).")
    flags.DEFINE_integer("max_new_tokens", 512, "")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy")
    flags.DEFINE_float("top_p", 1.0, "")
    flags.DEFINE_integer("top_k", 0, "")
    flags.DEFINE_integer("seed", 0, "")

    def run(_):
        from PIL import Image

        import mmjax
        from mmjax.data.tokenizer import load_tokenizer
        from mmjax.weights import CheckpointError

        F = flags.FLAGS
        try:
            model = mmjax.from_pretrained(F.model, dtype=F.dtype)
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        tokenizer = load_tokenizer(F.model)
        if not hasattr(model, "vision_model"):
            print(f"error: {F.model} is a text-only checkpoint; mmjax.chat answers about images", file=sys.stderr)
            sys.exit(2)
        template = F.template or model.cfg.template or "internvl2_5"
        images = [Image.open(p) for p in F.image]
        print(answer(model, tokenizer, template, F.prompt, images, max_new_tokens=F.max_new_tokens,
                     temperature=F.temperature, top_p=F.top_p, top_k=F.top_k, seed=F.seed,
                     settings=settings_for(model, F.max_num)))

    app.run(run, argv)


if __name__ == "__main__":
    main()
