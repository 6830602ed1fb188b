"""The batch contract between the loader and the train step: keys, layout, the ignore index.

A batch of ``B`` packed rows of ``T`` tokens with a budget of ``K`` tiles per row:

    input_ids, labels, segment_ids, positions   (B, T) int32
    loss_weights                                (B, T) float32
    pixel_values                                (B * K, H, W, 3) float32   row b's tiles are [b*K, (b+1)*K)
    image_flags                                 (B * K,) int32             1 real tile, 0 padding slot
    num_samples, num_real_tokens, num_supervised_tokens   (B,) int32   (host-side counts)

Tiles keep one flat layout from the loader to the model: splitting the leading axis of every
``ROW_KEYS`` array into equal parts (processes, devices, micro-batches) keeps each row with its
tiles, so nothing is reshaped on the way. Labels are not shifted (the loss shifts); ``-100``
(``IGNORE_INDEX``) marks a token that is not supervised.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100

# per-row arrays the train step consumes (device arrays, split over devices and micro-batches)
ROW_KEYS = ("input_ids", "labels", "segment_ids", "positions", "loss_weights", "pixel_values", "image_flags")
# the XComposer2 family's (B, T) int32 arrays besides them (mmjax.models.xcomposer2): where each
# position's image token comes from (-1 text) and its tile's slot in the row (-1 none)
IMAGE_TOKEN_KEYS = ("image_token", "image_tile")
# tile arrays among them: leading axis B * K
TILE_KEYS = ("pixel_values", "image_flags")
# per-row counts the host reads for throughput metrics
COUNT_KEYS = ("num_samples", "num_real_tokens", "num_supervised_tokens")


def row_keys(image_tokens: bool = False) -> tuple[str, ...]:
    """The per-row keys of a batch: ``ROW_KEYS``, plus ``IMAGE_TOKEN_KEYS`` for the XComposer2 family."""
    return ROW_KEYS + (IMAGE_TOKEN_KEYS if image_tokens else ())


def batch_shapes(rows: int, tokens: int, tiles_per_row: int, image_size: int,
                 image_tokens: bool = False) -> dict[str, tuple[tuple, np.dtype]]:
    """``{key: (shape, dtype)}`` of the :func:`row_keys` of a batch of ``rows`` rows."""
    names = ("input_ids", "labels", "segment_ids", "positions") + (IMAGE_TOKEN_KEYS if image_tokens else ())
    out = {k: ((rows, tokens), np.dtype(np.int32)) for k in names}
    out["loss_weights"] = ((rows, tokens), np.dtype(np.float32))
    out["pixel_values"] = ((rows * tiles_per_row, image_size, image_size, 3), np.dtype(np.float32))
    out["image_flags"] = ((rows * tiles_per_row,), np.dtype(np.int32))
    return out
