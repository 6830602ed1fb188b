"""InternLM-XComposer2 image preprocessing: the plain square resize and the HD grid transform, as
tiles for :class:`mmjax.models.xcomposer2.XComposer2` (channels-last float32, CLIP-normalised).

Plain (``hd_num = -1``; IXC2-7B at 224 px, IXC2-VL at 490): a bicubic resize to ``img_size`` squared
(aspect not kept), one tile.

HD (IXC2-4KHD with 336-px crops, ``variant='4khd'``; IXC2.5 training with 560-px crops, ``'2.5'``):

1. a portrait image is transposed (axes swapped) to landscape, and back at the end;
2. ``scale`` = the widest grid of crop-wide columns whose rows keep ``scale * ceil(scale / ratio)``
   within ``hd_num``; IXC2.5's training transform caps it at ``ceil(1.5 * width / crop)``;
3. a bilinear resize to width ``scale * crop`` and height ``int(width / ratio)`` (always to that
   grid, up or down);
4. white padding to the next multiple of ``crop`` in height, centred (the odd pixel at the bottom);
5. tiles: the global view (the whole padded, normalised image resized to ``crop`` squared with
   PyTorch's bicubic, no antialiasing, as upstream's vision tower does on device) followed by the
   ``h x w`` crops row by row.

An image's token count and layout follow from its grid (:func:`mmjax.models.xcomposer2.image_token_count`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# OpenAI CLIP's normalisation at full precision (XComposer2's processors)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HD_VARIANTS = ("4khd", "2.5")


def _normalized(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    return (arr - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def plain_tile(image: Image.Image, img_size: int) -> np.ndarray:
    """(1, img_size, img_size, 3): the bicubic square resize of the non-HD variants."""
    return _normalized(image.convert("RGB").resize((img_size, img_size), Image.Resampling.BICUBIC))[None]


def max_grid_columns(width: int, height: int, hd_num: int) -> int:
    """The largest ``scale`` with ``scale * ceil(scale * height / width) <= hd_num`` (width >= height)."""
    if hd_num < 1:
        raise ValueError(f"hd_num must be >= 1 for the HD transform, got {hd_num}")
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= hd_num:
        scale += 1
    return scale


def hd_canvas(image: Image.Image, hd_num: int, crop: int, variant: str = "4khd") -> tuple[Image.Image, tuple[int, int]]:
    """The resized, white-padded RGB image and its grid ``(rows, cols)`` of ``crop``-px crops."""
    if variant not in HD_VARIANTS:
        raise ValueError(f"HD variant must be one of {HD_VARIANTS}, got {variant!r}")
    img = image.convert("RGB")
    transposed = img.width < img.height
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    width, height = img.size
    ratio = width / height
    scale = max_grid_columns(width, height, hd_num)
    if variant == "2.5":
        scale = min(math.ceil(1.5 * width / crop), scale)
    new_w = int(scale * crop)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    target = math.ceil(new_h / crop) * crop
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(img, (0, (target - new_h) // 2))
    if transposed:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    return canvas, (canvas.height // crop, canvas.width // crop)


def _bicubic_global_view(arr: np.ndarray, crop: int) -> np.ndarray:
    """(H, W, 3) -> (crop, crop, 3) as torch's ``interpolate(mode='bicubic', align_corners=False)``."""
    from mmjax.models.internvit import bicubic_matrix
    mh, mw = bicubic_matrix(arr.shape[0], crop), bicubic_matrix(arr.shape[1], crop)
    out = np.einsum("oh,hwc->owc", mh, arr.astype(np.float64))
    return np.einsum("pw,owc->opc", mw, out).astype(np.float32)


def hd_tiles(image: Image.Image, hd_num: int, crop: int, variant: str = "4khd") -> tuple[np.ndarray, tuple[int, int]]:
    """(1 + rows * cols, crop, crop, 3) tiles (global view, then the crops row-major) and the grid."""
    canvas, grid = hd_canvas(image, hd_num, crop, variant)
    return tiles_of_canvas(_normalized(canvas), crop), grid


def normalized(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32: /255, then CLIP's mean and std."""
    return _normalized(image.convert("RGB"))


def tiles_of_canvas(arr: np.ndarray, crop: int) -> np.ndarray:
    """A normalised (rows * crop, cols * crop, 3) canvas -> its global view and crops (row-major)."""
    rows, cols = arr.shape[0] // crop, arr.shape[1] // crop
    if (rows * crop, cols * crop) != arr.shape[:2]:
        raise ValueError(f"canvas {arr.shape[:2]} is not a grid of {crop}-px crops")
    crops = arr.reshape(rows, crop, cols, crop, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, crop, crop, 3)
    return np.concatenate([_bicubic_global_view(arr, crop)[None], crops])
