"""InternVL composition: float32 logits parity with transformers' InternVLForConditionalGeneration (Qwen3
text), from both checkpoint layouts; dummy tiles; image-token count checks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mmjax.models import internvl
from mmjax.weights.rules import assign
from tests import hf_fixtures_internvl as fx

K = fx.TOKENS_PER_TILE
CTX = fx.IMAGE_TOKEN_ID


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.std(b))


def _load(directory, image_token_id=None):
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    cfg = internvl.InternVLConfig.from_dict(config, image_token_id)
    model = nnx.eval_shape(lambda: internvl.InternVL(cfg, rngs=nnx.Rngs(0)))   # every param is assigned below
    tensors = fx.load_safetensors_dir(directory)
    if cfg.layout == "hf":
        tensors = {internvl.canonical_hf_key(k): v for k, v in tensors.items()}
    rules = model.weight_rules()
    assert len({r.path for r in rules}) == len(rules) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assign(model, rules, tensors, model.num_layers_map())
    return model


_JIT = {}


def _run(model, ids, px=None, flags=None):
    """Jitted ``(forward logits, mismatch, __call__ logits)``; compiled once per graph and shape."""
    graphdef, state = nnx.split(model)
    if graphdef not in _JIT:
        @jax.jit
        def fwd(state, ids, px, flags):
            m = nnx.merge(graphdef, state)
            logits, bad = m.forward(ids, pixel_values=px, image_flags=flags)
            return logits, bad, m(ids, pixel_values=px, image_flags=flags)
        _JIT[graphdef] = fwd
    if px is not None and flags is None:
        flags = np.ones((px.shape[0],), np.int32)
    to = lambda x: None if x is None else jnp.asarray(x)
    logits, bad, called = _JIT[graphdef](state, to(ids), to(px), to(flags))
    return np.asarray(logits), bool(bad), np.asarray(called)


def _inputs(seed=0):
    """Two rows: row 0 holds an image of 2 tiles, row 1 an image of 1 tile; 3 real tiles."""
    rs = np.random.RandomState(seed)
    t = 20
    ids = rs.randint(0, CTX, size=(2, t)).astype(np.int32)
    ids[0, 3:3 + 2 * K] = CTX
    ids[1, 5:5 + K] = CTX
    px = rs.randn(3, fx.IMAGE_SIZE, fx.IMAGE_SIZE, 3).astype(np.float32)
    return ids, px


def _torch_logits(model, ids, px=None):
    with torch.no_grad():
        kw = {} if px is None else {"pixel_values": torch.from_numpy(px.transpose(0, 3, 1, 2).copy())}
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), **kw).logits.numpy()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    d, ref = fx.make_hf_internvl(str(tmp_path_factory.mktemp("ivl_hf")), vit="300m", text="qwen3", seed=0)
    return _load(d), ref


def test_hf_config(hf_pair):
    model, _ = hf_pair
    cfg = model.cfg
    assert (cfg.layout, cfg.ps_version, cfg.select_layer, cfg.img_context_token_id, cfg.num_image_token) == (
        "hf", "v2", -1, CTX, K)
    assert cfg.vision.qkv_layout == "separate" and cfg.text.family == "qwen3"
    assert model.hf_layout == "internvl_hf"
    keys = {r.hf_key for r in model.weight_rules()}
    assert {"lm_head.weight", "model.language_model.embed_tokens.weight", "model.multi_modal_projector.linear_1.weight",
            "model.vision_tower.encoder.layer.{i}.attention.q_proj.weight"} <= keys


def test_hf_logits_parity_with_images(hf_pair):
    model, ref = hf_pair
    ids, px = _inputs()
    want = _torch_logits(ref, ids, px)
    got, bad, called = _run(model, ids, px)
    assert got.dtype == np.float32 and got.shape == want.shape == (2, 20, fx.VOCAB_SIZE)
    assert not bad
    assert _rel(got, want) <= 1e-3, _rel(got, want)
    np.testing.assert_array_equal(called, got)
    # the images matter: text-only logits differ at and after the image positions
    text_only = _torch_logits(ref, np.where(ids == CTX, 1, ids))
    assert _rel(text_only, want) > 1e-2


def test_text_only_parity(hf_pair):
    model, ref = hf_pair
    ids = np.random.RandomState(3).randint(0, CTX, size=(2, 9)).astype(np.int32)
    got = np.asarray(model(jnp.asarray(ids)))                   # eager path
    assert _rel(got, _torch_logits(ref, ids)) <= 1e-3


def test_dummy_tile_dropped(hf_pair):
    model, _ = hf_pair
    ids, px = _inputs()
    base = _run(model, ids, px)[0]
    dummy = np.full((1,) + px.shape[1:], 7.0, np.float32)
    px4 = np.concatenate([px[:1], dummy, px[1:]], axis=0)       # dummy tile in the middle
    got, bad, _ = _run(model, ids, px4, np.array([1, 0, 1, 1], np.int32))
    assert not bad
    np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5 * np.std(base))
    # flagging a real tile instead changes the result
    other, bad, _ = _run(model, ids, px4, np.array([1, 1, 0, 1], np.int32))
    assert not bad and _rel(other, base) > 1e-3


@pytest.mark.parametrize("chunk", [2])   # groups of 2: a computed padding slot and skipped groups (CI time: one case)
def test_tile_chunk_skips_padding_tiles(hf_pair, chunk):
    """Empty tile slots are never encoded: with ``tile_chunk`` the logits and every gradient equal
    the one-batch path's, and padding tiles full of NaN (which the one-batch path's backward turns
    into NaN weight gradients) leave everything finite, so they were skipped, not computed."""
    model, _ = hf_pair
    ids, px = _inputs()
    nan = np.full((1,) + px.shape[1:], np.nan, np.float32)
    # real tiles in slots 1, 3, 4; in real-first order the padding slot 0 shares the group of the
    # last real tile when chunk = 2 (it is computed, so it holds zeros), slots 2 and 5 form groups
    # of their own (NaN: they must not be computed)
    px6 = np.concatenate([np.zeros_like(nan), px[:1], nan, px[1:], nan], axis=0)
    flags = np.array([0, 1, 0, 1, 1, 0], np.int32)
    probe = jax.random.normal(jax.random.PRNGKey(0), (2, 20, fx.VOCAB_SIZE))

    def loss_and_grads(m, pixels):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            logits, bad = nnx.merge(graphdef, p, rest).forward(
                jnp.asarray(ids), pixel_values=jnp.asarray(pixels), image_flags=jnp.asarray(flags))
            return jnp.sum(logits * probe), (logits, bad)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    def with_chunk(c):
        m = nnx.merge(*nnx.split(model))
        m.cfg = dataclasses.replace(model.cfg, tile_chunk=c)
        return m

    (_, (base, bad0)), g0 = loss_and_grads(with_chunk(0), np.nan_to_num(px6))
    (_, (got, bad)), g = loss_and_grads(with_chunk(chunk), px6)
    assert not bad0 and not bad
    np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-5 * float(np.std(base)))
    vit = [np.asarray(x) for x in jax.tree.leaves(g["vision_model"])]
    assert all(np.isfinite(x).all() for x in vit) and any(np.abs(x).max() > 0 for x in vit)
    # per tensor, relative to its own norm, with a floor at the whole gradient's scale (a tensor
    # whose gradient is ~0 holds float32 rounding only)
    scale = float(np.sqrt(sum(np.sum(np.square(np.asarray(b, np.float64))) for b in jax.tree.leaves(g0))))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6 * scale
    # the one-batch path does compute the padding tiles: their NaN reaches the ViT's gradients
    (_, _), g_nan = loss_and_grads(with_chunk(0), px6)
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g_nan["vision_model"]))


def test_count_mismatch_raises(hf_pair):
    model, _ = hf_pair
    ids, px = _inputs()
    short = ids.copy()
    short[1, 5] = 1                                             # one context token fewer
    with pytest.raises(ValueError, match=rf"{3 * K - 1}.*{3 * K}"):
        model(jnp.asarray(short), pixel_values=jnp.asarray(px))
    with pytest.raises(ValueError, match=rf"{3 * K}.*{2 * K}"):          # upstream's (N, 1) flags
        model(jnp.asarray(ids), pixel_values=jnp.asarray(px), image_flags=jnp.asarray([[1], [1], [0]]))
    with pytest.raises(ValueError, match="image token mismatch"):
        model(jnp.asarray(ids))                                 # context tokens without images
    m2 = nnx.merge(*nnx.split(model))
    m2.cfg = dataclasses.replace(model.cfg, img_context_token_id=None)
    with pytest.raises(ValueError, match="img_context_token_id"):
        m2(jnp.asarray(ids), pixel_values=jnp.asarray(px))


def test_jit_flag(hf_pair):
    model, _ = hf_pair
    ids, px = _inputs()
    _, bad, called = _run(model, ids, px, np.array([1, 0, 1], np.int32))
    assert bad and np.isnan(called).all()
    short = ids.copy()
    short[0, 3] = 1
    logits, bad, called = _run(model, short, px)
    assert bad and np.isfinite(logits).all() and np.isnan(called).all()


@pytest.mark.parametrize("vit", ["6b", "300m"])
def test_upstream_layout_parity(tmp_path, vit):
    d, ref = fx.make_upstream_internvl(str(tmp_path / vit), vit=vit, text="qwen3", seed=1)
    model = _load(d, image_token_id=CTX)
    cfg = model.cfg
    assert (cfg.layout, cfg.vision.qkv_layout, cfg.template, cfg.vision.qk_normalization) == (
        "internvl_chat", "fused", "internvl2_5", vit == "6b")
    assert model.hf_layout == "internvl_chat"
    ids, px = _inputs(seed=2)
    got, bad, _ = _run(model, ids, px)
    want = _torch_logits(ref, ids, px)
    assert not bad
    assert _rel(got, want) <= 1e-3, _rel(got, want)


def test_canonical_keys():
    assert internvl.canonical_hf_key("language_model.model.layers.0.mlp.up_proj.weight") == \
        "model.language_model.layers.0.mlp.up_proj.weight"
    assert internvl.canonical_hf_key("language_model.lm_head.weight") == "lm_head.weight"
    assert internvl.canonical_hf_key("vision_tower.embeddings.cls_token") == "model.vision_tower.embeddings.cls_token"
    assert internvl.canonical_hf_key("model.vision_tower.embeddings.cls_token") == \
        "model.vision_tower.embeddings.cls_token"


def test_generate_with_images(hf_pair):
    model, ref = hf_pair
    ids, px = _inputs()
    ids = ids[:1, :12]                                          # row 0: 2 tiles of context tokens, 8 slots
    out, lengths = model.generate(jnp.asarray(ids), pixel_values=jnp.asarray(px[:2]), max_new_tokens=2)
    want = _torch_logits(ref, ids, px[:2])[0, -1].argmax()
    assert int(out[0, 0]) == int(want) and int(lengths[0]) == 2


def test_canonical_key_checkpoint_loads_same(hf_pair, tmp_path):
    model, _ = hf_pair
    d, _ = fx.make_hf_internvl(str(tmp_path / "canon"), vit="300m", text="qwen3", seed=0, canonical_keys=True)
    keys = set(fx.load_safetensors_dir(d))
    assert "lm_head.weight" in keys and "model.vision_tower.embeddings.cls_token" in keys
    other = _load(d)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(other, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_intern_s1_mini_layout_loads_matches_and_saves_back_byte_for_byte(tmp_path):
    """Intern-S1(-mini) publishes transformers InternVL's tensor names under its own model_type
    (``interns1``, remote code ``InternS1ForConditionalGeneration``): the same loader reads it, the
    logits match the transformers model of those weights, and a save writes every file back
    byte for byte."""
    import mmjax
    d, ref = fx.make_hf_internvl(str(tmp_path / "s1"), vit="300m", text="qwen3", seed=3, canonical_keys=True)
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    cfg.update(model_type="interns1", architectures=["InternS1ForConditionalGeneration"],
               auto_map={"AutoConfig": "configuration_interns1.InternS1Config",
                         "AutoModelForCausalLM": "modeling_interns1.InternS1ForConditionalGeneration"})
    cfg["vision_config"]["model_type"] = "interns1_vision"
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    model = mmjax.from_pretrained(d, dtype="float32")   # the real loading path: layout from config.json
    assert model.hf_layout == "internvl_hf" and model.cfg.text.family == "qwen3"
    ids, px = _inputs()
    got, bad, _ = _run(model, ids, px)
    assert not bad and _rel(got, _torch_logits(ref, ids, px)) <= 1e-3
    out = tmp_path / "saved"
    mmjax.save_pretrained(model, str(out))
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == open(os.path.join(d, name), "rb").read(), name
