"""XComposer2 data (``data.template = 'ixc2'``): records from XComposer's JSON lists into IXC2 samples
whose ids, image tokens and labels equal upstream's interleaving and label rule
(tests/ixc2_reference.py), packed rows that keep every sample's tiles, and training on them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from mmjax.data import build_dataset
from mmjax.data.batch import IGNORE_INDEX
from mmjax.data.config import default_data_config
from mmjax.models import xcomposer2 as xc
from tests import ixc2_reference as ref

CORPUS = ["What is in the picture? A red square on a white field.", "Describe both images.",
          "The first one is blue, the second one is green.", "Hello, how are you? I am fine, thanks."] * 20


def _image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return os.path.basename(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer, three images and an XComposer JSON list covering the cases: a lone image
    without placeholder (goes before the text, BOS after it), two placed images over two turns, a
    text-only conversation, an image placed mid-text."""
    root = tmp_path_factory.mktemp("ixc2_data")
    tok = ref.build_ixc2_tokenizer(str(root / "tok"), CORPUS)
    a, b, c = (_image(str(root / n), w, h, s) for n, w, h, s in
               (("a.png", 60, 40, 0), ("b.png", 30, 90, 1), ("c.png", 50, 50, 2)))
    records = [
        {"id": 0, "image": [a], "conversations": [
            {"from": "user", "value": "What is in the picture?"}, {"from": "assistant", "value": "A red square."}]},
        {"id": 1, "image": [a, b], "conversations": [
            {"from": "user", "value": "Image1 <ImageHere>; Image2 <ImageHere>; Describe both images."},
            {"from": "assistant", "value": "The first one is blue,"},
            {"from": "user", "value": "And the second?"}, {"from": "assistant", "value": "the second one is green."}]},
        {"id": 2, "conversations": [{"from": "human", "value": "Hello, how are you?"},
                                    {"from": "bot", "value": "I am fine, thanks."}]},
        {"id": 3, "image": [c], "conversations": [
            {"from": "user", "value": "Look: <ImageHere> What is it?"}, {"from": "gpt", "value": "A field."}]},
    ]
    (root / "data.json").write_text(json.dumps(records))
    return root, tok, records


def _data_cfg(root, **kw):
    d = default_data_config()
    d.data_txt = str(root / "data.json")
    d.template = "ixc2"
    d.image_size = 28
    d.num_image_token = 1          # a 28-px HD crop: 2 x 2 patches merged to 1 x 1 tokens
    d.hd_num = 4
    d.hd_variant = "4khd"
    d.max_length = 512
    d.shuffle = False
    d.update(kw)
    return d


@pytest.mark.parametrize("max_length", [512, 40])
def test_samples_equal_upstream_interleaving_and_labels(workspace, max_length):
    root, tok, records = workspace
    cfg = _data_cfg(root, max_length=max_length, max_skip_fraction=1.0)
    ds = build_dataset(cfg, tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    end = tok.convert_tokens_to_ids("[UNUSED_TOKEN_145]")
    seen = 0
    for k, rec in enumerate(records):
        sample = ds[k]
        if sample is None:    # cut before any answer: a counted skip (only in the short case)
            assert max_length == 40
            continue
        seen += 1
        # upstream: conv2text, a lone image prepended, per-part tokenization with BOS on the first part
        text = ref.conv2text_reference(rec["conversations"])
        grids = []
        for name in rec.get("image", []):
            _, grid = ref.hd_transform_reference(Image.open(root / name), 4, 28, "4khd")
            grids.append(grid)
        counts = [ref.hd_token_count(h, w, 1) for h, w in grids]
        ids, im_mask = ref.wrap_training_sample(text, lambda s: tok.encode(s, add_special_tokens=False), counts,
                                                bos_id=bos, max_length=max_length)
        labels = ref.mask_human_targets_reference(ids, im_end_id=end, eos_id=eos)
        is_image = sample["image_token"] != xc.TEXT
        assert is_image.tolist() == list(im_mask), rec["id"]
        got_ids = np.where(is_image, -100, sample["input_ids"])
        assert got_ids.tolist() == ids, rec["id"]
        assert sample["labels"].tolist() == labels, rec["id"]
        # every image token names a real tile: the global view + the crops of each image, in order
        assert sample["pixel_values"].shape[0] == sample["image_tile"].max(initial=-1) + 1
        if rec["id"] == 0 and max_length == 512:
            assert is_image[0] and sample["input_ids"][counts[0]] == bos      # [image][BOS][text]
    assert seen >= 2


def test_packed_rows_move_tile_numbers_past_earlier_samples(workspace):
    from mmjax.data import build_loader
    root, tok, records = workspace
    cfg = _data_cfg(root, pack_max_length=512, max_tiles_per_pack=32, batch_size=2, packing="first_fit")
    ds = build_dataset(cfg, tok)
    alone = {int(ds[k]["index"]): ds[k] for k in range(len(records))}
    batch = next(iter(build_loader(cfg, tok, dataset=ds, process_index=0, process_count=1)))
    k = cfg.max_tiles_per_pack
    assert set(("image_token", "image_tile")) <= set(batch)
    matched = moved_some = 0
    for row in range(batch["input_ids"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, int(seg.max()) + 1):
            pos = seg == s
            ids = batch["input_ids"][row][pos]
            sample = next(v for v in alone.values() if len(v["input_ids"]) == len(ids)
                          and np.array_equal(v["input_ids"], ids))
            tiles = batch["image_tile"][row][pos]
            real = tiles >= 0
            if real.any():   # the row's tiles at the moved numbers are the sample's own tiles
                moved = tiles[real]
                own = sample["image_tile"][real]
                np.testing.assert_array_equal(batch["pixel_values"][row * k + moved], sample["pixel_values"][own])
                moved_some += int(np.any(moved != own))
            np.testing.assert_array_equal(batch["image_token"][row][pos], sample["image_token"])
            matched += 1
    assert matched >= len(records) and moved_some     # (epochs repeat: rows hold more than one pass)


def test_a_system_turn_is_a_counted_skip(workspace, tmp_path):
    root, tok, _ = workspace
    recs = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Hello"},
                               {"from": "assistant", "value": "Hi."}]},
            {"conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi."}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    cfg = _data_cfg(root, data_txt=str(tmp_path / "d.json"), max_skip_fraction=1.0)
    ds = build_dataset(cfg, tok)
    assert ds[0] is None and ds[1] is not None
    assert "no system turn" in str(ds.mmjax_source.skip_summary())


# ---- training ------------------------------------------------------------------------------------


def _ixc_config(root, tok, ckpt, **extra):
    from mmjax.config import base_config
    c = base_config()
    c.model_path = ckpt
    c.data.update(_data_cfg(root, pack_max_length=256, max_tiles_per_pack=16, batch_size=2, max_length=256))
    c.data.max_skip_fraction = 1.0
    c.model.dtype = "float32"
    c.total_steps = 5
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.0
    c.checkpoint.every_steps = 100
    c.eval.enabled = False
    c.export.dtype = "float32"
    c.update_from_flattened_dict(extra)
    return c


@pytest.fixture(scope="module")
def checkpoint(workspace):
    root, tok, _ = workspace
    ckpt = ref.write_tiny_checkpoint(str(root / "ckpt"), "hd", vocab_size=len(tok), plora_r=16, qkv_plora_r=8,
                                     vit_image_size=28, vit_hidden=32, vit_heads=2)
    tok.save_pretrained(ckpt)
    return ckpt


@pytest.mark.parametrize("lora", [False, True])
def test_five_steps_full_and_lora(workspace, checkpoint, tmp_path, lora):
    import jax
    from flax import nnx
    from mmjax.train import run as run_lib
    from safetensors.numpy import load_file

    root, tok, _ = workspace
    # the upstream LoRA script: fix_vit and fix_sampler (the separators follow the sampler's flag)
    extra = {"lora.llm_rank": 4, "lora.dropout": 0.05, "freeze.mlp": True} if lora else {}
    cfg = _ixc_config(root, tok, checkpoint, **extra)
    wd = tmp_path / "wd"
    run_lib.train(cfg, str(wd))
    losses = [json.loads(line)["train/loss"] for line in open(wd / "metrics.jsonl") if "train/loss" in line]
    assert len(losses) == 5 and all(np.isfinite(losses))
    init = load_file(os.path.join(checkpoint, "model.safetensors"))
    out = load_file(str(wd / "hf" / "model.safetensors"))
    assert set(out) == set(init)                 # the upstream layout, every key, nothing invented
    qkv = "model.layers.0.attention.wqkv.weight"
    assert not np.array_equal(out[qkv], init[qkv])          # trained (full) / merged adapters (LoRA)
    plora = "model.layers.0.attention.wqkv.Plora_A.weight"
    vit = xc.VIT_PREFIX + "encoder.layers.0.mlp.fc1.weight"
    assert np.array_equal(out[vit], init[vit])              # fix_vit (freeze.backbone) by default
    if lora:
        assert np.array_equal(out[plora], init[plora])      # adapters only: PLoRA and separators frozen
        assert np.array_equal(out["plora_sub_GN"], init["plora_sub_GN"])
        assert np.array_equal(out["vision_proj.0.weight"], init["vision_proj.0.weight"])
        adapter = load_file(str(wd / "hf_adapter" / "adapter_model.safetensors"))
        assert "base_model.model.model.layers.0.attention.wqkv.lora_A.weight" in adapter
        assert not any("Plora" in k or "GN" in k for k in adapter)
        _peft_adapter_matches_the_merged_export(checkpoint, wd, root)
    else:
        assert not np.array_equal(out[plora], init[plora])  # PLoRA trains with the LLM in full fine-tuning
        assert not np.array_equal(out["plora_sub_GN"], init["plora_sub_GN"])   # with the sampler


def test_data_check_and_show_read_ixc2_samples(workspace, tmp_path):
    """`python -m mmjax.data check / show` on XComposer data with the ixc2 template."""
    import subprocess
    import sys
    root, tok, records = workspace
    tok.save_pretrained(str(tmp_path / "tok"))
    cfg_file = tmp_path / "ixc_cfg.py"
    cfg_file.write_text(
        "from mmjax.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.tokenizer_path = {str(tmp_path / 'tok')!r}\n"
        f"    c.data.data_txt = {str(root / 'data.json')!r}\n"
        "    c.data.template = 'ixc2'\n"
        "    c.data.image_size = 28\n    c.data.num_image_token = 1\n    c.data.hd_num = 4\n"
        "    return c\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    check = subprocess.run([sys.executable, "-m", "mmjax.data", "check", f"--config={cfg_file}"],
                           capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    assert f"{len(records)}" in check.stdout
    show = subprocess.run([sys.executable, "-m", "mmjax.data", "show", f"--config={cfg_file}", "--index=1"],
                          capture_output=True, text=True, env=env)
    assert show.returncode == 0, show.stderr
    assert "image 1:" in show.stdout and "image 2:" in show.stdout and "A red square." not in show.stdout
    assert show.stdout.count("<image: ") == 2   # each image's positions as one run, not the placeholder's text


def _peft_adapter_matches_the_merged_export(checkpoint, wd, root):
    """The exported adapter, attached by ``peft.PeftModel`` to a torch model of upstream's layout
    built from the base checkpoint, gives the logits of mmjax's merged export on an image sample."""
    import jax.numpy as jnp
    import peft
    import torch
    from mmjax.data import hd_images
    from mmjax.weights.loader import from_pretrained

    base = ref.load_reference(checkpoint)
    image = Image.open(root / "a.png")
    canvas, grid = hd_images.hd_canvas(image, 4, 28, "4khd")
    arr = hd_images.normalized(canvas)
    ids = [5, 6, 7] + [999] * ref.hd_token_count(*grid, 1) + [8, 9, 10, 11]
    embeds, im_mask = base.embed_segments([ids[:3], arr.transpose(2, 0, 1), ids[-4:]])
    torch_lm = peft.PeftModel.from_pretrained(ref.torch_language_model(base), str(wd / "hf_adapter"))
    assert sum(1 for n, _ in torch_lm.named_modules() if n.endswith(".lora_A")) == 5 * 2   # 5 targets x 2 layers
    with torch.no_grad():
        want = torch_lm.get_base_model()(embeds, im_mask).numpy()     # the adapted modules, in place
    merged = from_pretrained(str(wd / "hf"))
    kind, tile = xc.image_token_layout(grid, 1)
    n = len(kind)
    kinds = np.asarray([xc.TEXT] * 3 + kind.tolist() + [xc.TEXT] * 4)[None]
    tiles = np.asarray([-1] * 3 + tile.tolist() + [-1] * 4)[None]
    got = np.asarray(merged(jnp.asarray([[5, 6, 7] + [0] * n + [8, 9, 10, 11]]),
                            pixel_values=jnp.asarray(hd_images.tiles_of_canvas(arr, 28)),
                            image_token=jnp.asarray(kinds), image_tile=jnp.asarray(tiles)))[0]
    assert np.abs(got - want).max() <= 1e-4 * want.std(), np.abs(got - want).max() / want.std()
    with torch.no_grad():   # the adapter matters: without it the logits move far beyond that tolerance
        plain = ref.torch_language_model(base)(embeds, im_mask).numpy()
    assert np.abs(plain - want).max() > 1e-2 * want.std(), np.abs(plain - want).max() / want.std()


@pytest.mark.parametrize("override, message", [
    ({"eval.enabled": True}, "does not support XComposer2"),
    ({"data.template": "internlm2-chat"}, "needs data.template='ixc2'"),
    ({"data.num_image_token": 4}, "gives 1 tokens"),
    ({"data.image_size": 56}, "crop size of its HD grid is 28"),
    ({"data.hd_num": -1}, "is an HD variant"),
])
def test_settings_the_checkpoint_contradicts_are_refused(workspace, checkpoint, override, message):
    from mmjax.train.setup import ConfigError, build_run
    root, tok, _ = workspace
    extra = dict(override)
    if "eval.enabled" in extra:
        extra["eval.annotation"] = str(root / "data.json")
    cfg = _ixc_config(root, tok, checkpoint, **extra)
    with pytest.raises(ConfigError, match=message):
        build_run(cfg, with_data=False)


def test_a_bad_sample_counts_once_against_the_skip_budget(workspace, tmp_path):
    """A record that fails when built (an unreadable image) is one skip however often it is built
    (the start-up probe, then every epoch): 1 bad of 120 passes a 1 % budget."""
    root, tok, _ = workspace
    (tmp_path / "bad.png").write_bytes(b"not an image")
    good = {"conversations": [{"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi."}]}
    bad = {"image": [str(tmp_path / "bad.png")], "conversations": good["conversations"]}
    (tmp_path / "d.json").write_text(json.dumps([bad] + [good] * 119))
    cfg = _data_cfg(root, data_txt=str(tmp_path / "d.json"), max_skip_fraction=0.01)
    ds = build_dataset(cfg, tok)
    src = ds.mmjax_source
    bad_index = next(k for k in range(120) if src.record(k)[1].images)
    for _ in range(3):
        assert ds[bad_index] is None
    assert src.skipped() == 1 and "1 of 120 samples skipped" in src.skip_summary()
