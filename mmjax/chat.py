"""Ask a model about images: a prompt from ``mmjax.data.prompts``, KV-cached decoding, the CLI:

    python -m mmjax.chat --model=DIR --image=IMG --prompt="Describe the image."
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.prompts import ImageSettings, build_prompt, end_token_id, settings_for


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


def answer_xcomposer2(model, tokenizer, question: str, images=(), *, hd_num: int | None = None,
                      hd_variant: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
    """An XComposer2 model's reply: the prompt laid out as its training data (``mmjax.data.xcomposer``),
    images by the training transform (HD grid of ``hd_num`` crops: default 18 for 560-px crops
    (IXC2.5), 16 otherwise), stopping at ``[UNUSED_TOKEN_145]`` or ``</s>``."""
    from mmjax.data import xcomposer as xc_data
    cfg = model.cfg
    tok = xc_data.XComposerTokens(tokenizer)
    if hd_num is None:
        hd_num = (18 if cfg.img_size == 560 else 16) if cfg.hd else -1
    variant = hd_variant or ("2.5" if cfg.img_size == 560 else "4khd")
    ids, kinds, tiles, pv = xc_data.prompt(tok, question, [im.convert("RGB") for im in images],
                                           image_size=cfg.img_size, tokens_side=cfg.tokens_side,
                                           hd_num=hd_num if cfg.hd else -1, hd_variant=variant)
    out, lengths = model.generate(jnp.asarray(ids), None if pv is None else jnp.asarray(pv), jnp.asarray(kinds),
                                  jnp.asarray(tiles), max_new_tokens=max_new_tokens,
                                  eos_token_ids=[tok.im_end, tok.eos], temperature=temperature, top_p=top_p,
                                  top_k=top_k, rng=jax.random.PRNGKey(seed), pad_token_id=tok.pad_id)
    n = int(lengths[0])
    return tokenizer.decode(np.asarray(out[0, :n]).tolist(), skip_special_tokens=True).strip()


def main(argv=None):
    from absl import app, flags

    flags.DEFINE_string("model", None, "HF checkpoint directory (InternVL layouts, XComposer2).", required=True)
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
    flags.DEFINE_integer("hd_num", None, "XComposer2 HD variants: max crops per image (default 18 at 560 px, else 16).")
    flags.DEFINE_string("hd_variant", None, "XComposer2 HD transform: 4khd | 2.5 (default: 2.5 at 560 px).")

    def run(_):
        from PIL import Image

        import mmjax
        from mmjax.data.tokenizer import load_tokenizer
        from mmjax.errors import exit_on_expected

        F = flags.FLAGS
        model = exit_on_expected(mmjax.from_pretrained, F.model, dtype=F.dtype)
        tokenizer = exit_on_expected(load_tokenizer, F.model)
        images = exit_on_expected(lambda: [Image.open(p) for p in F.image])
        from mmjax.models.xcomposer2 import XComposer2
        if isinstance(model, XComposer2):   # multi-image prompts place images at <ImageHere>
            print(answer_xcomposer2(model, tokenizer, F.prompt, images, hd_num=F.hd_num, hd_variant=F.hd_variant,
                                    max_new_tokens=F.max_new_tokens, temperature=F.temperature, top_p=F.top_p,
                                    top_k=F.top_k, seed=F.seed))
            return
        if not hasattr(model, "vision_model"):
            print(f"error: {F.model} is a text-only checkpoint; mmjax.chat answers about images", file=sys.stderr)
            sys.exit(2)
        template = F.template or model.cfg.template or "internvl2_5"
        print(answer(model, tokenizer, template, F.prompt, images, max_new_tokens=F.max_new_tokens,
                     temperature=F.temperature, top_p=F.top_p, top_k=F.top_k, seed=F.seed,
                     settings=settings_for(model, F.max_num)))

    from mmjax.errors import parse_flags_or_exit
    app.run(run, argv, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    main()
