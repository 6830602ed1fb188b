"""The chat path: prompt building with the template + dynamic tiling, KV-cached greedy answers, and
the `python -m mmjax.chat` CLI on a generated tiny InternVL-Chat checkpoint."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mmjax
from mmjax.chat import answer
from mmjax.data.prompts import ImageSettings, build_prompt, end_token_id
from mmjax.data.synthetic import generate_shapes_dataset
from mmjax.data.tokenizer import load_tokenizer


def tiny_cfg():
    from mmjax.config import sibling_config
    cfg = sibling_config(os.path.join(os.path.dirname(__file__), "..", "configs", "x.py"), "tiny")
    cfg.synthetic.num_train = 8
    cfg.synthetic.num_eval = 2
    cfg.synthetic.vision = dict(cfg.synthetic.vision, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)
    cfg.synthetic.llm = dict(cfg.synthetic.llm, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    return cfg


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mmjax.data.embedded import build_tiny_checkpoint
    root = tmp_path_factory.mktemp("chat")
    cfg = tiny_cfg()
    paths = generate_shapes_dataset(str(root / "data"), 8, 2, seed=0)
    d = build_tiny_checkpoint(cfg, str(root / "init"), paths)
    return d, paths


def test_prompt_has_one_context_block_per_tile(ckpt):
    d, paths = ckpt
    tok = load_tokenizer(d)
    img = Image.new("RGB", (112, 56), (255, 255, 255))
    ids, pv, flags = build_prompt(tok, "internlm2-chat", "What colour?", [img], num_image_token=4,
                                  settings=ImageSettings(image_size=56, max_num=4))
    # 112x56 -> a 2x1 grid + thumbnail = 3 tiles of 4 tokens
    assert pv.shape == (3, 56, 56, 3) and flags.tolist() == [1, 1, 1]
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int(np.sum(ids == ctx)) == 12
    text = tok.decode(ids[0])
    assert text.endswith("<|im_start|>assistant\n") and "<img>" in text and "What colour?" in text


def test_greedy_answer_is_argmax_of_full_forward(ckpt):
    d, paths = ckpt
    tok = load_tokenizer(d)
    model = mmjax.from_pretrained(d)
    img = Image.open(os.path.join(paths["root"], "images", "eval_00000.png"))
    settings = ImageSettings(image_size=56, max_num=4)
    ids, pv, flags = build_prompt(tok, "internlm2-chat", "How many shapes are there?", [img], num_image_token=4,
                                  settings=settings)
    out, lengths = model.generate(jnp.asarray(ids), pixel_values=jnp.asarray(pv), image_flags=jnp.asarray(flags),
                                  max_new_tokens=3, eos_token_ids=[end_token_id(tok, "internlm2-chat")])
    seq = np.asarray(ids)
    for k in range(int(lengths[0])):
        logits = model(jnp.asarray(seq), pixel_values=jnp.asarray(pv), image_flags=jnp.asarray(flags))
        nxt = int(np.argmax(np.asarray(logits[0, -1])))
        assert nxt == int(out[0, k])
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    text = answer(model, tok, "internlm2-chat", "How many shapes are there?", [img], max_new_tokens=3,
                  settings=settings)
    assert text == tok.decode(np.asarray(out[0, :int(lengths[0])]).tolist(), skip_special_tokens=True).strip()


def test_chat_cli(ckpt):
    d, paths = ckpt
    img = os.path.join(paths["root"], "images", "eval_00001.png")
    r = subprocess.run([sys.executable, "-m", "mmjax.chat", f"--model={d}", f"--image={img}",
                        "--prompt=What colour are the shapes?", "--max_new_tokens=3", "--dtype=float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("\n")   # random weights may answer anything (even nothing), but it answers

    bad = subprocess.run([sys.executable, "-m", "mmjax.chat", f"--model={d}_missing", f"--image={img}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "does not exist" in bad.stderr
