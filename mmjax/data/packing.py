"""Packing processed samples into fixed-shape rows: a token budget and a tile budget per row.

A *sample* (the contract of ``mmjax.data.build_dataset``) is a dict with ``input_ids`` int32 (L,),
``labels`` int32 (L,) (-100 = not supervised), ``pixel_values`` float32 (tiles, H, W, 3) (tiles may be
0) and ``image_flags`` int32 (tiles,), plus metadata that packing ignores.

A *row* is what one line of a batch holds (T tokens, K = tile budget):

    input_ids   (T,) int32    padding = pad id
    labels      (T,) int32    aligned with input_ids (NOT shifted; the loss shifts); -100 on padding
    segment_ids (T,) int32    0 = padding, 1..n = n-th sample of the row
    positions   (T,) int32    restart at 0 for every sample, 0 on padding
    loss_weights(T,) float32  len2weight of the sample's supervised-token count, 0 where labels == -100
    pixel_values(K, H, W, 3) float32  the row's real tiles in sample order, then zero tiles
    image_flags (K,) int32    1 real tile, 0 padding tile
    num_samples, num_real_tokens, num_supervised_tokens   () int32

Which samples share a row is decided by grain's packers (``FirstFitPackIterDataset`` /
``BestFitPackIterDataset``). Their multi-feature ``length_struct`` gives each feature its own budget
along axis 0, and a bin accepts a sample only if *every* feature still fits, so ``{input_ids: T,
labels: T, loss_weights: T, image_flags: K}`` enforces both budgets at once. Pixels are not in the
length struct: grain would allocate a dense ``(bins, K, H, W, 3)`` buffer per packing round (7 GB for
64 bins x 48 tiles of 448 px). They travel as a non-sequence meta feature (a per-row list of the
samples' tile arrays, in the order the samples were placed) and ``finalize_row`` concatenates them
into the K-tile block. The packer's state is "parent state at the last emitted round + rows emitted",
so checkpoints stay small and JSON-able; restoring re-packs that round deterministically.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import grain
import numpy as np

from mmjax.data.batch import COUNT_KEYS, IGNORE_INDEX, IMAGE_TOKEN_KEYS, ROW_KEYS

LOSS_REDUCTIONS = ("token", "sample", "square")
PACKERS = {
    "first_fit": grain.experimental.FirstFitPackIterDataset,
    "best_fit": grain.experimental.BestFitPackIterDataset,
}
_TOKEN_KEYS = ("input_ids", "labels", "loss_weights")
BATCH_KEYS = ROW_KEYS + COUNT_KEYS

log = logging.getLogger(__name__)


def len2weight(num_supervised: int, reduction: str) -> float:
    """InternVL's per-token weight for a sample with ``num_supervised`` supervised tokens."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if num_supervised <= 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / num_supervised
    return 1.0 / math.sqrt(num_supervised)


def prepare_sample(sample: dict, *, loss_reduction: str, image_shape: tuple[int, int, int]) -> dict:
    """Casts a processed sample to the packer's dtypes and adds ``loss_weights``.

    Runs in the data workers. The first label of the sample is set to -100: no token of the
    sample precedes it, so it can never be predicted, and masking it keeps a shifted loss from
    predicting one packed sample's first token from the previous sample's last token. The
    supervised count ``x`` of len2weight is taken after that.
    """
    ids = np.asarray(sample["input_ids"], np.int32).reshape(-1)
    labels = np.array(sample["labels"], np.int32).reshape(-1)
    if ids.shape != labels.shape:
        raise ValueError(f"input_ids {ids.shape} and labels {labels.shape} differ in length")
    if labels.size:
        labels[0] = IGNORE_INDEX
    supervised = labels != IGNORE_INDEX
    weights = np.where(supervised, len2weight(int(supervised.sum()), loss_reduction), 0.0)
    pixels = sample.get("pixel_values")
    pixels = (np.zeros((0, *image_shape), np.float32) if pixels is None
              else np.asarray(pixels, np.float32))
    flags = sample.get("image_flags")
    flags = np.ones(len(pixels), np.int32) if flags is None else np.asarray(flags, np.int32).reshape(-1)
    if pixels.shape[1:] != tuple(image_shape) or len(flags) != len(pixels):
        raise ValueError(f"pixel_values {pixels.shape} / image_flags {flags.shape} do not match "
                         f"(tiles, {', '.join(map(str, image_shape))})")
    out = dict(input_ids=ids, labels=labels, loss_weights=weights.astype(np.float32),
               pixel_values=pixels, image_flags=flags)
    for k in IMAGE_TOKEN_KEYS:       # XComposer2 samples
        if k in sample:
            out[k] = np.asarray(sample[k], np.int32).reshape(-1)
            if out[k].shape != ids.shape:
                raise ValueError(f"{k} {out[k].shape} and input_ids {ids.shape} differ in length")
    if "id" in sample:
        out["id"] = sample["id"]
    return out


def budget_violation(sample: dict, max_tokens: int, max_tiles: int) -> str | None:
    """A message if ``sample`` can never fit in a row of (max_tokens, max_tiles), else None."""
    n, k = len(sample["input_ids"]), len(sample["pixel_values"])
    if n > max_tokens or k > max_tiles:
        return (f"sample {sample.get('id', '?')!r} has {n} tokens and {k} tiles; a row holds at most "
                f"{max_tokens} tokens and {max_tiles} tiles")
    return None


class BudgetCheckIterDataset(grain.IterDataset):
    """Raises on (``on_oversize='error'``) or drops and counts (``'skip'``) samples over budget.

    Never truncates. The number skipped so far is in the iterator state (so it survives a
    restore) and mirrored into ``self.stats['skipped']`` for the loader to report.
    """

    def __init__(self, parent, *, max_tokens: int, max_tiles: int, on_oversize: str = "error"):
        super().__init__(parent)
        if on_oversize not in ("error", "skip"):
            raise ValueError(f"on_oversize must be 'error' or 'skip', got {on_oversize!r}")
        self.max_tokens, self.max_tiles, self.on_oversize = max_tokens, max_tiles, on_oversize
        self.stats = {"skipped": 0}

    def __iter__(self):
        return _BudgetCheckIterator(self._parent.__iter__(), self)


class _BudgetCheckIterator(grain.DatasetIterator):

    def __init__(self, parent, ds: BudgetCheckIterDataset):
        super().__init__(parent)
        self._ds = ds
        ds.stats["skipped"] = 0

    def __next__(self):
        while True:
            sample = next(self._parent)
            problem = budget_violation(sample, self._ds.max_tokens, self._ds.max_tiles)
            if problem is None:
                return sample
            if self._ds.on_oversize == "error":
                raise ValueError(problem + " (set on_oversize='skip' to drop such samples)")
            self._ds.stats["skipped"] += 1
            log.warning("skipping over-budget %s", problem)

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self._ds.stats["skipped"]}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._ds.stats["skipped"] = int(state["skipped"])


def pack(ds: grain.IterDataset, *, algorithm: str, max_tokens: int, max_tiles: int, pad_id: int,
         num_bins: int, seed: int, max_samples_per_row: int | None = None,
         image_tokens: bool = False) -> grain.IterDataset:
    """Packs prepared samples with grain's first-fit / best-fit packer (both budgets enforced);
    ``image_tokens``: the samples carry the XComposer2 family's per-token image arrays."""
    if algorithm not in PACKERS:
        raise ValueError(f"packing must be one of {sorted(PACKERS)} or 'none', got {algorithm!r}")
    lengths = {"input_ids": max_tokens, "labels": max_tokens, "loss_weights": max_tokens,
               "image_flags": max_tiles}
    padding = {"input_ids": pad_id, "labels": IGNORE_INDEX, "loss_weights": 0.0, "image_flags": 0}
    if image_tokens:
        lengths.update({k: max_tokens for k in IMAGE_TOKEN_KEYS})
        padding.update({k: -1 for k in IMAGE_TOKEN_KEYS})
    return PACKERS[algorithm](
        ds, length_struct=lengths, padding_struct=padding, num_packing_bins=num_bins, seed=seed,
        shuffle_bins=True, meta_features=("pixel_values",),
        max_sequences_per_bin=max_samples_per_row)


def finalize_row(packed: dict, *, max_tiles: int, image_shape: tuple[int, int, int]) -> dict:
    """Turns one row of grain's packer output into the row layout of this module."""
    tiles = [np.asarray(p, np.float32) for p in packed["pixel_values"]]
    segs = packed["input_ids_segment_ids"].astype(np.int32)
    labels = packed["labels"].astype(np.int32)
    return _row(packed["input_ids"], labels, segs, packed["input_ids_positions"],
                packed["loss_weights"], tiles, max_tiles, image_shape, _image_tokens(packed, segs, tiles))


def _image_tokens(packed: dict, segs: np.ndarray, tiles: list) -> dict | None:
    """The row's XComposer2 image arrays, each sample's tile numbers moved past the tiles of the
    samples placed before it (segment s + 1 is the s-th sample placed; its tiles follow theirs)."""
    if IMAGE_TOKEN_KEYS[0] not in packed:
        return None
    tile = np.array(packed["image_tile"], np.int32)
    offset = 0
    for s, t in enumerate(tiles):
        tile[(segs == s + 1) & (tile >= 0)] += offset
        offset += len(t)
    return {"image_token": np.asarray(packed["image_token"], np.int32), "image_tile": tile}


def pad_row(sample: dict, *, max_tokens: int, max_tiles: int, pad_id: int,
            image_shape: tuple[int, int, int]) -> dict:
    """One prepared sample padded to a row of ``max_tokens`` (the unpacked mode)."""
    n = len(sample["input_ids"])
    ids = np.full(max_tokens, pad_id, np.int32)
    labels = np.full(max_tokens, IGNORE_INDEX, np.int32)
    weights = np.zeros(max_tokens, np.float32)
    segs = np.zeros(max_tokens, np.int32)
    pos = np.zeros(max_tokens, np.int32)
    ids[:n], labels[:n], weights[:n] = sample["input_ids"], sample["labels"], sample["loss_weights"]
    segs[:n], pos[:n] = 1, np.arange(n)
    extra = None
    if IMAGE_TOKEN_KEYS[0] in sample:
        extra = _no_image_tokens(max_tokens)
        for k in IMAGE_TOKEN_KEYS:
            extra[k][:n] = sample[k]
    return _row(ids, labels, segs, pos, weights, [sample["pixel_values"]], max_tiles, image_shape, extra)


def _no_image_tokens(n: int) -> dict:
    """XComposer2's per-token image arrays of ``n`` text / padding positions (-1: no image token)."""
    return {k: np.full(n, -1, np.int32) for k in IMAGE_TOKEN_KEYS}


def empty_row(*, max_tokens: int, max_tiles: int, pad_id: int, image_shape, image_tokens: bool = False) -> dict:
    """An all-padding row (fills a short last batch so shapes stay static)."""
    z = np.zeros(max_tokens, np.int32)
    extra = _no_image_tokens(max_tokens) if image_tokens else None
    return _row(np.full(max_tokens, pad_id, np.int32), np.full(max_tokens, IGNORE_INDEX, np.int32),
                z, z, np.zeros(max_tokens, np.float32), [], max_tiles, image_shape, extra)


def _row(ids, labels, segs, pos, weights, tiles, max_tiles, image_shape, image_tokens: dict | None = None) -> dict:
    pixels = np.zeros((max_tiles, *image_shape), np.float32)
    flags = np.zeros(max_tiles, np.int32)
    k = 0
    for t in tiles:
        pixels[k:k + len(t)] = t
        k += len(t)
    if k > max_tiles:  # the budget check and the packer make this unreachable
        raise AssertionError(f"{k} tiles in a row with a budget of {max_tiles}")
    flags[:k] = 1
    supervised = labels != IGNORE_INDEX
    return dict(
        input_ids=np.asarray(ids, np.int32), labels=np.asarray(labels, np.int32),
        segment_ids=np.asarray(segs, np.int32), positions=np.asarray(pos, np.int32),
        loss_weights=np.asarray(weights, np.float32), pixel_values=pixels, image_flags=flags,
        num_samples=np.int32(segs.max(initial=0)), num_real_tokens=np.int32((segs > 0).sum()),
        num_supervised_tokens=np.int32(supervised.sum()), **(image_tokens or {}))


def collate(rows: list[dict], *, batch_size: int, empty: dict) -> dict[str, Any]:
    """Stacks rows into a batch (the layout of ``mmjax.data.batch``); pads a short batch with
    ``empty`` rows. Tiles are concatenated: ``pixel_values`` (B * K, H, W, 3), ``image_flags`` (B * K,)."""
    rows = list(rows) + [empty] * (batch_size - len(rows))
    keys = BATCH_KEYS + tuple(k for k in IMAGE_TOKEN_KEYS if k in empty)
    batch = {k: np.stack([r[k] for r in rows]) for k in keys}
    batch["pixel_values"] = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:])
    batch["image_flags"] = batch["image_flags"].reshape(-1)
    return batch


def padding_fraction(batches) -> float:
    """Share of token slots that are padding over an iterable of batches."""
    real = total = 0
    for b in batches:
        real += int(b["num_real_tokens"].sum())
        total += b["input_ids"].size
    return 1.0 - real / max(total, 1)
