"""InternLM-XComposer2 family: float32 logits against the independent PyTorch reference
(tests/ixc2_reference.py: transformers' CLIPVisionModel + a hand-written PLoRA InternLM2), the
upstream checkpoint layout round trip, the HD transform and the image token layout."""

from __future__ import annotations

import filecmp
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax.data import hd_images
from mmjax.models import xcomposer2 as xc
from mmjax.weights.loader import from_pretrained
from mmjax.weights.saver import save_pretrained
from tests import ixc2_reference as ref

IMG_ID = 999      # the reference's image placeholder id (mmjax reads image_index instead)

# (variant, writer options): plain 28 px (IXC2-7B style), 70 px with the table stored resized (VL,
# as released) or native (resized at run time as upstream's resize_pos), 4KHD (wqkv rank 8:
# scaling 2), IXC2.5 (task LoRAs carried)
VARIANTS = {
    "plain": ("plain", {}),
    "vl490": ("vl490", {}),
    "vl490_native_positions": ("vl490", {"store_resized_pos": False}),
    "4khd": ("hd", {"qkv_plora_r": 8}),
    "2.5": ("hd25", {}),
}


def _checkpoint(tmp_path, name):
    variant, kw = VARIANTS[name]
    return ref.write_tiny_checkpoint(str(tmp_path / name), variant, plora_r=16, **kw)


def _sample(model, rng, hd_variant):
    """Text, image, text, image, text: (ids for the reference, ids + image_index + tiles for mmjax,
    the reference's pixel inputs)."""
    cfg = model.cfg
    if cfg.hd:
        images = [Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8)),     # landscape 1 x 2
                  Image.fromarray(rng.integers(0, 255, (90, 30, 3), dtype=np.uint8))]      # portrait
        canvases = [hd_images.hd_canvas(im, 6, cfg.img_size, hd_variant) for im in images]
        arrays = [hd_images.normalized(c) for c, _ in canvases]
        grids = [g for _, g in canvases]
        tiles = [hd_images.tiles_of_canvas(a, cfg.img_size) for a in arrays]
        ref_pixels = [a.transpose(2, 0, 1) for a in arrays]
    else:
        tiles = [hd_images.plain_tile(Image.fromarray(rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)), cfg.img_size)
                 for _ in range(2)]
        grids = [None, None]
        ref_pixels = [t[0].transpose(2, 0, 1) for t in tiles]
    ids, kinds, tile_of, first = [], [], [], 0
    for grid, t in zip(grids, tiles):
        text = [int(x) for x in rng.integers(3, 900, 5)]
        ids += text
        kinds += [xc.TEXT] * len(text)
        tile_of += [-1] * len(text)
        kind, tile = xc.image_token_layout(grid, cfg.tokens_side)
        ids += [IMG_ID] * len(kind)
        kinds += kind.tolist()
        tile_of += np.where(tile >= 0, tile + first, -1).tolist()
        first += t.shape[0]
    text = [int(x) for x in rng.integers(3, 900, 4)]
    ids += text
    kinds += [xc.TEXT] * len(text)
    tile_of += [-1] * len(text)
    return ids, (kinds, tile_of), np.concatenate(tiles), ref_pixels


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_the_pytorch_reference(tmp_path, name):
    path = _checkpoint(tmp_path, name)
    model = from_pretrained(path)
    assert model.cfg.hd == (VARIANTS[name][0] in ("hd", "hd25"))
    ids, (kinds, tile_of), tiles, ref_pixels = _sample(model, np.random.default_rng(0),
                                                       "4khd" if name == "4khd" else "2.5")
    mm_ids = [0 if i == IMG_ID else i for i in ids]
    got = np.asarray(model(jnp.asarray([mm_ids]), pixel_values=jnp.asarray(tiles), image_token=jnp.asarray([kinds]),
                           image_tile=jnp.asarray([tile_of])))[0]
    reference = ref.load_reference(path)
    want = ref.reference_logits(reference, ids, ref_pixels, image_token_id=IMG_ID)
    assert got.shape == want.shape
    # float32 in two stacks (summation order differs): 1e-4 of the logits' scale (measured ~1e-5)
    assert np.abs(got - want).max() <= 1e-4 * want.std(), np.abs(got - want).max() / want.std()
    # the partial LoRA is live: without it the reference moves far beyond the tolerance
    plain = ref.reference_logits(reference, ids, ref_pixels, image_token_id=IMG_ID, use_plora=False)
    assert np.abs(plain - want).max() > 1e-2 * want.std()


def test_sizes_come_from_the_tensors_without_a_vision_config(tmp_path):
    """Published checkpoints carry no vision config: the tower's sizes come from the shapes (head
    dim 64), the PLoRA ranks from Plora_A, wqkv's rank-8 branch scaled 2 (4KHD), the rest 1."""
    path = ref.write_tiny_checkpoint(str(tmp_path / "c"), "hd", plora_r=16, qkv_plora_r=8, vit_hidden=128,
                                     vit_heads=2, vit_intermediate=96, vision_config_key=None)
    cfg = from_pretrained(path).cfg
    v = cfg.vision
    assert (v.hidden_size, v.num_heads, v.num_layers, v.intermediate_size, v.image_size) == (128, 2, 2, 96, 56)
    assert cfg.hd and cfg.img_size == 56 and cfg.tokens_side == 2 and cfg.feature_dim == 512
    assert dict((n, (r, s)) for n, r, s in cfg.text.plora) == {
        "qkv_proj": (8, 2.0), "o_proj": (16, 1.0), "gate_proj": (16, 1.0), "up_proj": (16, 1.0),
        "down_proj": (16, 1.0)}


def test_load_save_is_byte_identical_and_carries_unused_tensors(tmp_path):
    """The upstream layout loads without its remote code and saves back byte for byte, the tensors
    the forward pass never reads (task LoRAs, post_layernorm, video_mem_proj, position_ids) included."""
    from safetensors.numpy import load_file, save_file
    path = _checkpoint(tmp_path, "2.5")
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert any(".lora_sft_A." in k for k in weights)
    p = xc.VIT_PREFIX
    weights[p + "post_layernorm.weight"] = np.ones(32, np.float32)
    weights[p + "post_layernorm.bias"] = np.zeros(32, np.float32)
    weights[p + "embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    weights["video_mem_proj.0.weight"] = np.full((4, 4), 0.5, np.float32)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    for name in ("modeling_internlm_xcomposer2.py", "tokenizer_config.json"):
        with open(os.path.join(path, name), "w") as f:
            f.write("# remote code: copied, never run\n" if name.endswith(".py") else "{}")
    model = from_pretrained(path)
    out = save_pretrained(model, str(tmp_path / "out"))
    for name in ("model.safetensors", "config.json", "modeling_internlm_xcomposer2.py", "tokenizer_config.json"):
        assert filecmp.cmp(os.path.join(path, name), os.path.join(out, name), shallow=False), name


def test_an_unknown_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file
    from mmjax.weights.safetensors_io import CheckpointError
    path = _checkpoint(tmp_path, "plain")
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["vision_proj.5.weight"] = np.zeros((2, 2), np.float32)
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor vision_proj.5.weight"):
        from_pretrained(path)


# ---- the HD transform ----------------------------------------------------------------------------

# (width, height): landscape, portrait, square, panoramas both ways, tiny, one-pixel strip, odd sizes
SIZES = [(640, 480), (480, 640), (336, 336), (3000, 200), (200, 3000), (5, 7), (1000, 1), (1234, 777), (77, 1234)]


@pytest.mark.parametrize("variant, crop, hd_num", [("4khd", 336, 16), ("4khd", 336, 25), ("2.5", 560, 18)])
def test_hd_canvas_matches_the_upstream_transform(variant, crop, hd_num):
    rng = np.random.default_rng(1)
    for w, h in SIZES:
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        canvas, grid = hd_images.hd_canvas(image, hd_num, crop, variant)
        want = ref.hd_transform_image(image, hd_num, crop, "4khd" if variant == "4khd" else "2.5")
        assert canvas.size == want.size and np.array_equal(np.asarray(canvas), np.asarray(want)), (w, h)
        rows, cols = grid
        assert (canvas.height, canvas.width) == (rows * crop, cols * crop)
        assert rows * cols <= hd_num
        # the formula: the long side gets the widest column count whose crop count fits hd_num
        long_, short = max(w, h), min(w, h)
        scale = max(s for s in range(1, hd_num + 1) if s * math.ceil(s * short / long_) <= hd_num)
        if variant == "2.5":
            scale = min(scale, math.ceil(1.5 * long_ / crop))
        assert (cols if w >= h else rows) == scale, (w, h, grid)


def test_hd_grid_and_token_counts_by_hand():
    # 4KHD, hd_num 16: a 2:1 landscape -> 5 columns x ceil(5/2) = 3 rows = 15 crops (6 x 3 = 18 > 16)
    image = Image.new("RGB", (800, 400), (10, 20, 30))
    assert hd_images.hd_canvas(image, 16, 336, "4khd")[1] == (3, 5)
    # 2.5 caps the columns at ceil(1.5 * 800 / 560) = 3 -> 3 x ceil(3 / 2) = 2 rows
    assert hd_images.hd_canvas(image, 18, 560, "2.5")[1] == (2, 3)
    # a portrait is transposed: the grid turns with it
    assert hd_images.hd_canvas(image.transpose(Image.Transpose.TRANSPOSE), 16, 336, "4khd")[1] == (5, 3)
    # a tiny image is upsampled to the widest grid: 4 x 4 for a square at hd_num 16
    assert hd_images.hd_canvas(Image.new("RGB", (3, 3)), 16, 336, "4khd")[1] == (4, 4)
    # token counts (upstream's formula and worked cases): 4KHD 4 x 4 -> 2509, 2.5 one crop -> 841, 3 x 6 -> 7681
    assert xc.image_token_count((4, 4), 12) == 2509
    assert xc.image_token_count((1, 1), 20) == 841
    assert xc.image_token_count((3, 6), 20) == 7681
    assert xc.image_token_count(None, 35) == 1225
    # the layout: global rows each closed by sub_GN, glb_GN, then mosaic rows crossing the crops
    kind, tile = xc.image_token_layout((1, 2), 2)
    f, S, G = xc.FEATURES, xc.SUB_GN, xc.GLB_GN
    assert kind.tolist() == [f, f + 1, S, f + 2, f + 3, S, G, f, f + 1, f, f + 1, S, f + 2, f + 3, f + 2, f + 3, S]
    assert tile.tolist() == [0, 0, -1, 0, 0, -1, -1, 1, 1, 2, 2, -1, 1, 1, 2, 2, -1]


def test_packed_rows_gather_each_rows_tiles(tmp_path):
    """Two rows of a batch, each its own sample and tiles: the same logits as each sample alone
    (image_tile counts slots within the row; row b's tiles sit at [b K, (b + 1) K))."""
    model = from_pretrained(_checkpoint(tmp_path, "4khd"))
    rng = np.random.default_rng(3)
    rows = [_sample(model, rng, "4khd") for _ in range(2)]
    t = max(len(r[0]) for r in rows)
    k = max(r[2].shape[0] for r in rows) + 1                      # a padding tile slot in each row
    ids = np.zeros((2, t), np.int32)
    kinds, tile_of = np.full((2, t), xc.TEXT, np.int32), np.full((2, t), -1, np.int32)
    mask = np.zeros((2, t), np.int32)
    pixels = np.zeros((2 * k,) + rows[0][2].shape[1:], np.float32)
    alone = []
    for b, (i, (kd, tl), px, _) in enumerate(rows):
        n = len(i)
        ids[b, :n] = [0 if x == IMG_ID else x for x in i]
        kinds[b, :n], tile_of[b, :n], mask[b, :n] = kd, tl, 1
        pixels[b * k:b * k + px.shape[0]] = px
        alone.append(np.asarray(model(jnp.asarray(ids[b:b + 1, :n]), pixel_values=jnp.asarray(px),
                                      image_token=jnp.asarray(kinds[b:b + 1, :n]),
                                      image_tile=jnp.asarray(tile_of[b:b + 1, :n])))[0])
    both = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), pixel_values=jnp.asarray(pixels),
                            image_token=jnp.asarray(kinds), image_tile=jnp.asarray(tile_of)))
    for b, (i, *_rest) in enumerate(rows):
        np.testing.assert_allclose(both[b, :len(i)], alone[b], rtol=0, atol=1e-5 * np.abs(alone[b]).max())


def test_global_view_is_torch_bicubic():
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(2)
    arr = rng.standard_normal((3 * 28, 2 * 28, 3)).astype(np.float32)
    tiles = hd_images.tiles_of_canvas(arr, 28)
    want = F.interpolate(torch.from_numpy(arr.transpose(2, 0, 1))[None], size=(28, 28), mode="bicubic",
                         align_corners=False)[0].numpy().transpose(1, 2, 0)
    assert tiles.shape == (7, 28, 28, 3)
    np.testing.assert_allclose(tiles[0], want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(tiles[1 + 1 * 2 + 1], arr[28:56, 28:56])     # crop (row 1, col 1)


def test_generation_with_images_matches_the_full_forward(tmp_path):
    """KV-cached greedy decoding after an image prompt (the partial LoRA at the prompt's image
    tokens) gives the tokens a full forward pass picks at every step."""
    model = from_pretrained(_checkpoint(tmp_path, "4khd"))
    ids, (kinds, tile_of), tiles, _ = _sample(model, np.random.default_rng(4), "4khd")
    mm_ids = [0 if i == IMG_ID else i for i in ids]
    px = jnp.asarray(tiles)
    out, lengths = model.generate(jnp.asarray([mm_ids]), px, jnp.asarray([kinds]), jnp.asarray([tile_of]),
                                  max_new_tokens=4)
    assert int(lengths[0]) == 4
    seq, k, t = list(mm_ids), list(kinds), list(tile_of)
    for step in range(4):
        logits = np.asarray(model(jnp.asarray([seq]), pixel_values=px, image_token=jnp.asarray([k]),
                                  image_tile=jnp.asarray([t])))[0, -1]
        assert int(out[0, step]) == int(np.argmax(logits)), step
        seq.append(int(out[0, step]))
        k.append(xc.TEXT)
        t.append(-1)


def test_chat_answers_with_an_xcomposer2_checkpoint(tmp_path):
    """``python -m mmjax.chat`` on an XComposer2 checkpoint with two images at <ImageHere>."""
    import subprocess
    import sys
    path = _checkpoint(tmp_path, "4khd")
    tok = ref.build_ixc2_tokenizer(str(tmp_path / "tok"), ["a red square", "what is it"] * 10, vocab_size=300)
    tok.save_pretrained(path)
    rng = np.random.default_rng(5)
    images = []
    for n, (w, h) in enumerate(((60, 40), (30, 80))):
        images.append(str(tmp_path / f"{n}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])
    res = subprocess.run([sys.executable, "-m", "mmjax.chat", f"--model={path}", f"--image={images[0]}",
                          f"--image={images[1]}", "--prompt=Image1 <ImageHere>; Image2 <ImageHere>; what is it?",
                          "--dtype=float32", "--max_new_tokens=3", "--hd_num=4"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert res.returncode == 0, res.stderr[-2000:]


def test_partial_lora_dropout_only_while_a_key_is_set():
    """The partial LoRA's input dropout (upstream p 0.05 while training): inverted dropout on the
    branch input with the step's key, at image positions only; off without a key (inference)."""
    import jax
    from flax import nnx
    from mmjax.models.layers import Dense, add_partial_lora
    from mmjax.models.lora import partial_lora_dropout_modules, set_lora_dropout_key

    dense = Dense(8, 6, axes=(None, None), rngs=nnx.Rngs(0))
    add_partial_lora(dense, 4, 2.0, rngs=nnx.Rngs(1), param_dtype=jnp.float32, dropout=0.5)
    dense.plora_b.set_value(jax.random.normal(jax.random.key(2), (4, 6)))
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    mask = jnp.asarray([[True, False, True, True, False]] * 2)
    base = x @ dense.kernel[...]
    branch = lambda h: 2.0 * (h @ dense.plora_a[...] @ dense.plora_b[...])     # noqa: E731
    np.testing.assert_allclose(dense(x, mask), base + jnp.where(mask[..., None], branch(x), 0), rtol=1e-5, atol=1e-6)
    holder = nnx.Module()
    holder.d = dense
    assert len(partial_lora_dropout_modules(holder)) == 1
    set_lora_dropout_key(holder, jax.random.key(7))
    keep = jax.random.bernoulli(jax.random.wrap_key_data(dense.plora_dropout_key[...]), 0.5, x.shape)
    want = base + jnp.where(mask[..., None], branch(jnp.where(keep, x / 0.5, 0.0)), 0)
    got = dense(x, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, base + jnp.where(mask[..., None], branch(x), 0))
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], np.asarray(base)[~np.asarray(mask)])
    set_lora_dropout_key(holder, None)
    np.testing.assert_allclose(dense(x, mask), base + jnp.where(mask[..., None], branch(x), 0), rtol=1e-5, atol=1e-6)


def test_token_chunks_give_the_same_logits(tmp_path):
    """The decoder's chunked per-token path carries the image mask chunk by chunk (partial LoRA)."""
    path = _checkpoint(tmp_path, "4khd")
    ids, (kinds, tile_of), tiles, _ = _sample(from_pretrained(path), np.random.default_rng(6), "4khd")
    args = (jnp.asarray([[0 if i == IMG_ID else i for i in ids]]),)
    kw = dict(pixel_values=jnp.asarray(tiles), image_token=jnp.asarray([kinds]), image_tile=jnp.asarray([tile_of]))
    whole = np.asarray(from_pretrained(path)(*args, **kw))
    chunked = np.asarray(from_pretrained(path, token_chunk=16)(*args, **kw))
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
