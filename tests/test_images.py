"""Dynamic tiling, RGB conversion and normalization (mmjax.data.images)."""

import numpy as np
import pytest
from PIL import Image

from mmjax.data import images as im

# Upstream orders (reference notes, section 2.4): CPython set order of (cols, rows) sorted by area.
REF_ORDER_12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
                (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
                (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]
REF_ORDER_6 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3),
               (1, 6), (3, 2)]


def test_candidate_order_matches_reference():
    assert im.candidate_grids(1, 12) == REF_ORDER_12
    assert im.candidate_grids(1, 6) == REF_ORDER_6
    assert all(2 <= c * r <= 4 for c, r in im.candidate_grids(2, 4))


@pytest.mark.parametrize("w,h,grid,tiles", [
    (448, 448, (1, 1), 1), (224, 224, (1, 1), 1), (800, 600, (4, 3), 13), (640, 480, (4, 3), 13),
    (500, 400, (4, 3), 13), (1024, 768, (4, 3), 13), (1920, 1080, (4, 2), 9), (1080, 1920, (2, 4), 9),
    (1000, 1000, (3, 3), 10), (2000, 2000, (3, 3), 10), (3000, 1000, (6, 2), 13)])
def test_reference_vectors(w, h, grid, tiles):
    assert im.tile_grid(w, h, 1, 12, 448) == grid
    assert im.num_tiles_for(w, h, 1, 12, 448, True) == tiles


def test_tie_break_on_area():
    # 2:1 ties between (2,1) and (4,2): a small image keeps the small grid, a big one takes the larger grid
    assert im.tile_grid(200, 100) == (2, 1)
    assert im.tile_grid(1792, 896) == (4, 2)


def test_tiles_row_major_and_thumbnail():
    # 4x3 grid of distinct flat colours: tile k must carry colour k (row-major), thumbnail last
    w, h = 800, 600
    arr = np.zeros((h, w, 3), np.uint8)
    for k in range(12):
        c, r = k % 4, k // 4
        arr[r * 200:(r + 1) * 200, c * 200:(c + 1) * 200] = (k * 20, 255 - k * 20, (k * 37) % 256)
    tiles, grid = im.dynamic_preprocess(Image.fromarray(arr), 1, 12, 448, True)
    assert grid == (4, 3) and len(tiles) == 13
    for k in range(12):
        centre = np.asarray(tiles[k])[224, 224]
        np.testing.assert_allclose(centre, (k * 20, 255 - k * 20, (k * 37) % 256), atol=2)
    assert tiles[-1].size == (448, 448)
    no_thumb, _ = im.dynamic_preprocess(Image.fromarray(arr), 1, 12, 448, False)
    assert len(no_thumb) == 12


def test_real_photos_and_awkward_sizes():
    skd = pytest.importorskip("skimage.data")
    for name in ("astronaut", "chelsea", "coffee"):
        photo = Image.fromarray(getattr(skd, name)())
        pv, grid = im.process_image(photo, max_num=6, image_size=112)
        w, h = photo.size
        assert grid == im.tile_grid(w, h, 1, 6, 112)
        n = grid[0] * grid[1]
        assert pv.shape == (n + (n > 1), 112, 112, 3) and pv.dtype == np.float32
        assert np.isfinite(pv).all()
    for w, h in [(1, 1), (3, 1000), (1000, 3), (449, 447), (37, 91)]:
        pv, (c, r) = im.process_image(Image.new("RGB", (w, h), (10, 20, 30)), max_num=12, image_size=56)
        assert 1 <= c * r <= 12 and pv.shape[1:] == (56, 56, 3)


def test_normalization_values():
    white = im.normalize([Image.new("RGB", (8, 8), (255, 255, 255))], "imagenet", 8)
    np.testing.assert_allclose(white[0, 0, 0], (np.array([1, 1, 1]) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-6)
    black = im.normalize([Image.new("RGB", (8, 8))], "siglip", 8)
    np.testing.assert_allclose(black, -1.0)
    clip = im.normalize([Image.new("RGB", (8, 8))], "clip", 8)
    np.testing.assert_allclose(clip[0, 0, 0], -np.array([0.4814546, 0.4578275, 0.40821073]) /
                               np.array([0.2686295, 0.2613025, 0.2757711]), rtol=1e-6)
    with pytest.raises(ValueError, match="normalize_type"):
        im.normalize([], "nope", 8)


def test_rgb_conversion_modes():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))   # fully transparent
    assert np.asarray(im.to_rgb(rgba)).tolist()[0][0] == [255, 255, 255]          # composite on white
    assert np.asarray(im.to_rgb(rgba, alpha="drop"))[0, 0].tolist() == [10, 20, 30]  # upstream convert
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert 120 <= np.asarray(im.to_rgb(half))[0, 0, 0] <= 130
    la = Image.new("LA", (2, 2), (0, 0))
    assert np.asarray(im.to_rgb(la))[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    assert im.to_rgb(pal).mode == "RGB" and np.asarray(im.to_rgb(pal))[0, 0].tolist() == [200, 100, 50]
    pal.info["transparency"] = 0
    assert np.asarray(im.to_rgb(pal))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red
    assert np.asarray(im.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    i16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    assert i16.mode.startswith("I;16")
    assert np.asarray(im.to_rgb(i16))[0, 0].tolist() == [255, 255, 255]
    i16_mid = Image.fromarray(np.full((2, 2), 257 * 100, np.uint16))
    assert np.asarray(im.to_rgb(i16_mid))[0, 0].tolist() == [100, 100, 100]   # scaled, not clipped to 255
    gray = Image.new("L", (2, 2), 77)
    assert np.asarray(im.to_rgb(gray))[0, 0].tolist() == [77, 77, 77]
    one = Image.new("1", (2, 2), 1)
    assert np.asarray(im.to_rgb(one))[0, 0].tolist() == [255, 255, 255]


def test_load_image_roundtrip_modes(tmp_path):
    p = tmp_path / "a.png"
    Image.new("LA", (5, 3), (50, 255)).save(p)
    img = im.load_image(str(p))
    assert img.mode == "RGB" and img.size == (5, 3) and np.asarray(img)[0, 0].tolist() == [50, 50, 50]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(Exception):
        im.load_image(str(bad))


def test_jpeg_augmentation_seeded():
    skd = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skd.astronaut())
    a, _ = im.process_image(photo, max_num=2, image_size=64, augment_rng=np.random.default_rng(3))
    b, _ = im.process_image(photo, max_num=2, image_size=64, augment_rng=np.random.default_rng(3))
    c, _ = im.process_image(photo, max_num=2, image_size=64)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a - c).mean() < 0.2   # a mild degradation, not a different picture


def test_white_tile():
    t = im.white_tile("imagenet", 28)
    assert t.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(t[0, 5, 5], im.normalize([Image.new("RGB", (28, 28), "white")], "imagenet", 28)[0, 0, 0])
