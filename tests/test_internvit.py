"""InternViT and projector parity against transformers' InternVL vision tower (float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mmjax.models import internvit, projector
from mmjax.weights.rules import assign
from tests import hf_fixtures_internvl as fx


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.std(b) + 1e-12))


@pytest.fixture(scope="module", params=["300m", "6b"])
def vit_pair(request):
    model = fx.build_hf_model(vit=request.param, seed=1)
    tower = model.model.vision_tower
    cfg = internvit.config_from_hf(model.config.vision_config.to_dict())
    vit = nnx.eval_shape(lambda: internvit.InternViT(cfg, rngs=nnx.Rngs(0)))   # all params assigned below
    sd = {k[len("model.vision_tower."):]: v for k, v in fx.canonical_hf_state_dict(model).items()
          if k.startswith("model.vision_tower.")}
    assign(vit, vit.weight_rules("hf"), sd, cfg.num_layers)
    return request.param, tower, vit, cfg, model


_JIT = {}


def _vit(vit, px, layer=-1, key=None, as_rngs=False):
    """Jitted ViT forward (compiled once per graph, shape and select_layer); DropPath on iff ``key``
    (passed as a raw key, or as ``nnx.Rngs(dropout=key)`` with ``as_rngs``)."""
    graphdef, state = nnx.split(vit)
    cache_key = (graphdef, layer, key is None, as_rngs)
    if cache_key not in _JIT:
        def f(state, px, key):
            m = nnx.merge(graphdef, state)
            if key is None:
                return m(px, layer)
            return m(px, layer, deterministic=False, rngs=nnx.Rngs(dropout=key) if as_rngs else key)
        _JIT[cache_key] = jax.jit(f)
    return np.asarray(_JIT[cache_key](state, jnp.asarray(px), key))


def _torch_features(tower, pixels_nhwc, layer=-1):
    with torch.no_grad():
        out = tower(torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2))),
                    output_hidden_states=True)
    h = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    return h[:, 1:].numpy()


def test_config_variants(vit_pair):
    name, _, _, cfg, _ = vit_pair
    assert cfg.qkv_layout == "separate"
    assert (cfg.norm_type, cfg.qk_normalization, cfg.qkv_bias) == (
        ("layer_norm", False, True) if name == "300m" else ("rms_norm", True, False))


@pytest.mark.parametrize("size", [(56, 56), (84, 84), (70, 98)])
def test_vit_parity(vit_pair, size):
    _, tower, vit, _, _ = vit_pair
    px = np.random.RandomState(0).randn(3, size[0], size[1], 3).astype(np.float32)
    ref = _torch_features(tower, px)
    got = _vit(vit, px)
    assert got.shape == ref.shape == (3, (size[0] // 14) * (size[1] // 14), 64)
    assert _rel(got, ref) < 1e-4, _rel(got, ref)


def test_select_layer(vit_pair):
    _, tower, vit, _, _ = vit_pair
    px = np.random.RandomState(1).randn(3, 56, 56, 3).astype(np.float32)
    last = _vit(vit, px, -1)
    assert _rel(last, _torch_features(tower, px, 2)) < 1e-4
    for layer in (0, 1):
        got = _vit(vit, px, layer)
        assert _rel(got, _torch_features(tower, px, layer)) < 1e-4
        assert _rel(got, last) > 1e-2          # an intermediate layer, not the last one


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 6)), ((4, 4), (5, 7)), ((6, 6), (3, 4)), ((4, 4), (4, 4))])
def test_bicubic_matches_torch(src, dst):
    x = np.random.RandomState(2).randn(src[0], src[1], 5).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=dst,
                                          mode="bicubic", align_corners=False)[0].numpy().transpose(1, 2, 0)
    got = np.asarray(internvit.bicubic_resize_2d(jnp.asarray(x), *dst))
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)
    if src == dst:
        np.testing.assert_array_equal(internvit.bicubic_matrix(4, 4), np.eye(4))


def test_drop_path_only_when_not_deterministic(vit_pair):
    name, _, vit, cfg, _ = vit_pair
    if name != "300m":
        pytest.skip("DropPath does not depend on the variant")
    vit_dp = nnx.eval_shape(lambda: internvit.InternViT(dataclasses.replace(cfg, drop_path_rate=0.5),
                                                       rngs=nnx.Rngs(0)))
    nnx.update(vit_dp, nnx.state(vit, nnx.Param))
    px = np.random.RandomState(3).randn(3, 56, 56, 3).astype(np.float32)
    base = _vit(vit, px)
    np.testing.assert_allclose(_vit(vit_dp, px), base, rtol=1e-6, atol=1e-6)    # deterministic by default
    with pytest.raises(ValueError):
        vit_dp(jnp.asarray(px), deterministic=False)
    a = _vit(vit_dp, px, key=jax.random.key(0))
    b = _vit(vit_dp, px, key=jax.random.key(1), as_rngs=True)
    assert np.isfinite(a).all()
    assert np.abs(a - base).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    # per tile: a whole tile's branch is dropped (0) or kept and scaled by 1 / (1 - rate)
    y = np.asarray(internvit._drop_path(jnp.ones((64, 5, 3)), jax.random.key(2), jnp.float32(0.25)))
    per_tile = y.reshape(64, -1)
    np.testing.assert_allclose(np.unique(per_tile), [0.0, 1 / 0.75], rtol=1e-6)
    assert (per_tile == per_tile[:, :1]).all() and 0 < (per_tile[:, 0] == 0).sum() < 64


def test_weight_rules_cover_state(vit_pair):
    name, _, vit, cfg, _ = vit_pair
    n_params = len(jax.tree.leaves(nnx.state(vit, nnx.Param)))
    for layout in ("internvl_chat", "hf"):
        c = internvit.InternViTConfig(**{**cfg.__dict__, "qkv_layout": "fused" if layout == "internvl_chat"
                                         else "separate"})
        m = nnx.eval_shape(lambda: internvit.InternViT(c, rngs=nnx.Rngs(0)))
        rules = m.weight_rules(layout)
        assert len({r.path for r in rules}) == len(rules) == len(jax.tree.leaves(nnx.state(m, nnx.Param)))
    with pytest.raises(ValueError):
        vit.weight_rules("internvl_chat")   # module holds separate q/k/v
    assert n_params == len(vit.weight_rules("hf"))


def test_upstream_config():
    c300 = internvit.config_from_upstream(dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=448,
        patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False, layer_norm_eps=1e-6,
        initializer_factor=1.0, model_type="intern_vit_6b"))
    assert (c300.norm_type, c300.qkv_bias, c300.qk_normalization, c300.qkv_layout, c300.num_patches) == (
        "layer_norm", True, False, "fused", 1024)
    c6b = internvit.config_from_upstream(dict(hidden_size=3200, num_hidden_layers=45, num_attention_heads=25,
                                              intermediate_size=12800, image_size=448, patch_size=14))
    assert (c6b.norm_type, c6b.qkv_bias, c6b.qk_normalization, c6b.head_dim) == ("rms_norm", False, True, 128)


# ------------------------------------------------------------------------------------------------
# Pixel shuffle and projector
# ------------------------------------------------------------------------------------------------


def _shuffle_loop(x, version):
    """Reference layout written out cell by cell (InternVL reference study, section 1.4)."""
    n, h, w, c = x.shape
    out = np.zeros((n, (h // 2) * (w // 2), 4 * c), x.dtype)
    for i in range(h // 2):
        for j in range(w // 2):
            cell = np.concatenate([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1],
                                   x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], axis=-1)
            t = i * (w // 2) + j if version == "v2" else j * (h // 2) + i
            out[:, t] = cell
    return out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_layout(version):
    x = np.random.RandomState(4).randn(2, 6, 6, 3).astype(np.float32)
    got = np.asarray(projector.pixel_shuffle(jnp.asarray(x.reshape(2, 36, 3)), 0.5, version))
    np.testing.assert_array_equal(got, _shuffle_loop(x, version))


def test_pixel_shuffle_v2_equals_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel
    x = np.random.RandomState(5).randn(2, 8, 8, 5).astype(np.float32)
    ref = InternVLModel.pixel_shuffle(None, torch.from_numpy(x), 0.5).reshape(2, -1, 20).numpy()
    np.testing.assert_array_equal(np.asarray(projector.pixel_shuffle(jnp.asarray(x), 0.5, "v2")), ref)
    assert not np.array_equal(np.asarray(projector.pixel_shuffle(jnp.asarray(x), 0.5, "v1")), ref)


def test_projector_parity(vit_pair):
    model = vit_pair[4]
    sd = {k[len("model.multi_modal_projector."):]: v for k, v in fx.canonical_hf_state_dict(model).items()
          if k.startswith("model.multi_modal_projector.")}
    proj = nnx.eval_shape(lambda: projector.MLPProjector(256, 64, rngs=nnx.Rngs(0)))
    assign(proj, proj.weight_rules("hf"), sd, 0)
    x = np.random.RandomState(6).randn(3, 4, 256).astype(np.float32)
    with torch.no_grad():
        ref = model.model.multi_modal_projector(torch.from_numpy(x)).numpy()
    assert _rel(np.asarray(proj(jnp.asarray(x))), ref) < 1e-5
    up = {f"{i}.{s}": sd[f"{n}.{s}"] for i, n in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2"))
          for s in ("weight", "bias")}
    proj2 = nnx.eval_shape(lambda: projector.MLPProjector(256, 64, rngs=nnx.Rngs(1)))
    assign(proj2, proj2.weight_rules("internvl_chat"), up, 0)
    np.testing.assert_array_equal(np.asarray(proj2(jnp.asarray(x))), np.asarray(proj(jnp.asarray(x))))
