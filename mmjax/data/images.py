"""Image decoding, RGB conversion, InternVL dynamic tiling and normalization (channels-last float32).

Tiling follows InternVL's ``dynamic_preprocess`` exactly: candidate grids are built as a Python set of
``(cols, rows)`` tuples sorted by area (ties keep CPython's set-iteration order, which is deterministic for
small int tuples), the closest aspect ratio wins, an exact tie prefers the later (larger) grid only when
``W*H > 0.5 * size**2 * cols * rows``; tiles are cropped row-major after a bicubic resize, and a thumbnail of
the whole image is appended when there is more than one tile.

RGB conversion policy (documented departure): images with transparency (RGBA, LA, PA, P with a transparency
entry) are composited on a white background. Upstream uses ``Image.convert('RGB')``, which drops alpha and
exposes whatever colour is stored under transparent pixels (often black). Set ``alpha='drop'`` for the
upstream behaviour; opaque images are identical either way. 16-bit / 32-bit integer images are scaled to
8 bits (``I;16``: value / 257) instead of being clipped at 255 as a plain ``convert`` would. EXIF orientation
is not applied (as upstream).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def candidate_grids(min_num, max_num):
    """Candidate (cols, rows) grids in the order upstream's ``sorted(set(...), key=area)`` gives."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if min_num <= i * j <= max_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def tile_grid(width, height, min_num=1, max_num=12, image_size=448):
    """(cols, rows) chosen for an image of ``width`` x ``height``."""
    return find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)


def num_tiles_for(width, height, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    n = cols * rows
    return n + 1 if (use_thumbnail and n != 1) else n


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=True):
    """Split an RGB PIL image into tiles. Returns (list of PIL tiles, (cols, rows))."""
    width, height = image.size
    cols, rows = tile_grid(width, height, min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((x, y, x + image_size, y + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles, (cols, rows)


def to_rgb(image, alpha="white"):
    """Convert any PIL mode to RGB (see the module docstring for the policy)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            hi = arr.max() if arr.size else 0
            if hi > 65535:
                arr = arr * (255.0 / hi)
            elif hi > 255:
                arr = arr / 257.0
        else:  # float images: [0, 1] floats are scaled, others clipped
            if arr.size and arr.max() <= 1.0:
                arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        if alpha == "drop":
            return image.convert("RGBA").convert("RGB") if mode in ("P", "PA") else image.convert("RGB")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path, alpha="white"):
    """Open and fully decode an image file as RGB. Raises OSError / ValueError on unreadable files."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im, alpha=alpha)


def jpeg_degrade(tile, quality):
    buf = io.BytesIO()
    tile.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        im.load()
        return im.convert("RGB")


def normalize(tiles, normalize_type="imagenet", image_size=448):
    """List of PIL tiles -> float32 array (n, H, W, 3): /255 then (x - mean) / std."""
    if normalize_type not in NORMALIZE:
        raise ValueError(f"unknown normalize_type {normalize_type!r}; choose from {sorted(NORMALIZE)}")
    mean, std = (np.asarray(v, np.float32) for v in NORMALIZE[normalize_type])
    out = np.empty((len(tiles), image_size, image_size, 3), np.float32)
    for k, t in enumerate(tiles):
        if t.size != (image_size, image_size):
            t = t.resize((image_size, image_size), Image.BICUBIC)
        arr = np.asarray(t, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        out[k] = (arr - mean) / std
    return out


def process_image(image, *, min_num=1, max_num=12, image_size=448, use_thumbnail=True, dynamic=True,
                  normalize_type="imagenet", augment_rng=None):
    """RGB PIL image -> (pixel_values float32 (n, H, W, 3), (cols, rows)).

    ``augment_rng`` (a numpy Generator) enables the JPEG-quality augmentation: each tile is re-encoded at
    a quality drawn uniformly from 75..100 (as upstream's per-tile RandomChoice).
    """
    if dynamic:
        tiles, grid = dynamic_preprocess(image, min_num, max_num, image_size, use_thumbnail)
    else:
        tiles, grid = [image.resize((image_size, image_size), Image.BICUBIC)], (1, 1)
    if augment_rng is not None:
        tiles = [jpeg_degrade(t, augment_rng.integers(75, 101)) for t in tiles]
    return normalize(tiles, normalize_type, image_size), grid


def white_tile(normalize_type="imagenet", image_size=448):
    """The dummy tile for text-only samples: a white image (upstream: 224x224 white resized), normalized."""
    return normalize([Image.new("RGB", (image_size, image_size), (255, 255, 255))], normalize_type, image_size)
