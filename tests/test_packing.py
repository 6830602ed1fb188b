"""Packing: row structure, both budgets, tile order, loss weights, efficiency (mmjax.data.packing)."""

import math

import grain
import ml_collections
import numpy as np
import pytest

from mmjax.data import packing
from mmjax.data.pipeline import build_loader

BOS, IMG, PAD = 1, 7, 3
TOKENS_PER_TILE = 4
SIZE = 4  # image_size of the synthetic tiles


def make_sample(i, lo=16, hi=256, max_tiles=3):
    """Synthetic processed sample i: BOS, 4 <IMG_CONTEXT> per tile, then text token 1000+i.

    Tile t of sample i is filled with the value 10*i + t + 1, so a tile says whose it is.
    """
    r = np.random.default_rng(i)
    tiles = int(r.integers(0, max_tiles + 1))
    n = int(r.integers(lo, hi + 1))
    ids = np.full(n, 1000 + i, np.int32)
    ids[0] = BOS
    ids[1:1 + tiles * TOKENS_PER_TILE] = IMG
    labels = np.full(n, -100, np.int32)
    cut = int(r.integers(1, n))
    labels[cut:] = ids[cut:]
    pv = np.zeros((tiles, SIZE, SIZE, 3), np.float32) + (10 * i + np.arange(tiles) + 1)[:, None, None, None]
    return dict(input_ids=ids, labels=labels, pixel_values=pv, image_flags=np.ones(tiles, np.int32),
                id=f"s{i}", source="synthetic")


def synthetic(n, **kw):
    return grain.MapDataset.range(n).map(lambda i: make_sample(i, **kw))


def config(**kw):
    base = dict(max_length=256, pack_max_length=512, max_tiles_per_pack=6, image_size=SIZE, seed=0,
                batch_size=2, pad_token_id=PAD, pack_num_bins=8, read_threads=0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def sample_id(tokens):
    """Recovers the synthetic sample index from a segment's tokens."""
    text = tokens[(tokens != BOS) & (tokens != IMG)]
    assert len(text) and np.all(text == text[0])
    return int(text[0]) - 1000


def segments(batch, b):
    """[(sample index, slice)] of row b, checking contiguity and positions on the way."""
    seg, pos = batch["segment_ids"][b], batch["positions"][b]
    n = int(seg.max(initial=0))
    out, start = [], 0
    for s in range(1, n + 1):
        idx = np.nonzero(seg == s)[0]
        assert len(idx) and idx[0] == start and np.all(np.diff(idx) == 1), "segment not contiguous/in order"
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        out.append((sample_id(batch["input_ids"][b, idx]), slice(idx[0], idx[-1] + 1)))
        start = idx[-1] + 1
    assert np.all(seg[start:] == 0) and np.all(pos[start:] == 0)
    return out


def check_batch(batch, cfg, reduction="token", make=make_sample):
    """Asserts every documented property of a batch; returns the sample ids seen."""
    T = cfg.max_length if cfg.get("packing", "first_fit") == "none" else cfg.pack_max_length
    K = cfg.max_tiles_per_pack
    B = batch["input_ids"].shape[0]
    assert batch["input_ids"].shape == (B, T) and batch["pixel_values"].shape == (B * K, SIZE, SIZE, 3)
    for k in ("input_ids", "labels", "segment_ids", "positions", "image_flags", "num_samples"):
        assert batch[k].dtype == np.int32, k
    assert batch["loss_weights"].dtype == np.float32 and batch["pixel_values"].dtype == np.float32
    seen = []
    for b in range(B):
        segs = segments(batch, b)
        pad = batch["segment_ids"][b] == 0
        assert np.all(batch["input_ids"][b][pad] == PAD) and np.all(batch["labels"][b][pad] == -100)
        assert np.all(batch["loss_weights"][b][pad] == 0)
        want_tiles = []
        for i, sl in segs:
            ref = make(i)
            np.testing.assert_array_equal(batch["input_ids"][b, sl], ref["input_ids"])  # never truncated
            want_labels = ref["labels"].copy()
            want_labels[0] = -100
            np.testing.assert_array_equal(batch["labels"][b, sl], want_labels)
            sup = want_labels != -100
            w = packing.len2weight(int(sup.sum()), reduction)
            np.testing.assert_allclose(batch["loss_weights"][b, sl], np.where(sup, w, 0.0), rtol=1e-6)
            want_tiles += [10 * i + t + 1 for t in range(len(ref["pixel_values"]))]
            seen.append(i)
        tiles = batch["pixel_values"][b * K:(b + 1) * K]
        flags = batch["image_flags"][b * K:(b + 1) * K]
        k = len(want_tiles)
        assert k <= K
        np.testing.assert_array_equal(flags, [1] * k + [0] * (K - k))
        np.testing.assert_array_equal(tiles[:k, 0, 0, 0], want_tiles)  # in <IMG_CONTEXT> order
        assert np.all(tiles[k:] == 0)
        # one tile's worth of <IMG_CONTEXT> tokens per real tile, in the same row
        assert (batch["input_ids"][b] == IMG).sum() == TOKENS_PER_TILE * k
        assert batch["num_samples"][b] == len(segs)
        assert batch["num_real_tokens"][b] == (~pad).sum() <= T
        assert batch["num_supervised_tokens"][b] == (batch["labels"][b] != -100).sum()
    return seen


def test_len2weight():
    assert packing.len2weight(16, "token") == 1.0
    assert packing.len2weight(16, "sample") == 1 / 16
    assert packing.len2weight(16, "square") == 0.25
    assert packing.len2weight(0, "square") == 0.0
    with pytest.raises(ValueError):
        packing.len2weight(3, "mean")


def test_prepare_sample_masks_first_label_and_weights():
    s = dict(input_ids=[5, 6, 7, 8], labels=[5, -100, 7, 8])
    out = packing.prepare_sample(s, loss_reduction="sample", image_shape=(2, 2, 3))
    np.testing.assert_array_equal(out["labels"], [-100, -100, 7, 8])
    np.testing.assert_allclose(out["loss_weights"], [0, 0, 0.5, 0.5])
    assert out["pixel_values"].shape == (0, 2, 2, 3) and out["image_flags"].shape == (0,)
    with pytest.raises(ValueError):
        packing.prepare_sample(dict(input_ids=[1, 2], labels=[1]), loss_reduction="token", image_shape=(2, 2, 3))


@pytest.mark.parametrize("algorithm", ["first_fit", "best_fit"])
@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_packed_rows(algorithm, reduction):
    cfg = config(packing=algorithm, loss_reduction=reduction, num_epochs=1, drop_remainder=False)
    n = 60
    seen, tiles_bound = [], False
    for batch in build_loader(cfg, dataset=synthetic(n), process_index=0, process_count=1):
        seen += check_batch(batch, cfg, reduction)
        tiles_bound |= bool(batch["image_flags"].reshape(-1, cfg.max_tiles_per_pack).sum(1).max() == 6)
        assert batch["num_samples"].max() > 1  # actually packs
    assert sorted(seen) == list(range(n))  # each sample exactly once in one epoch
    assert tiles_bound  # the tile budget was the binding constraint somewhere


def test_tile_budget_binds_before_token_budget():
    # tiny texts, 3 tiles each: tokens would allow ~30 samples a row, tiles allow 2
    def make(i):
        return make_sample(i, lo=16, hi=16, max_tiles=3)
    cfg = config(num_epochs=1, drop_remainder=False, loss_reduction="token")
    most = 0
    for batch in build_loader(cfg, dataset=grain.MapDataset.range(20).map(make), process_index=0,
                              process_count=1):
        check_batch(batch, cfg, make=make)
        tiles = batch["image_flags"].reshape(2, -1).sum(1)
        assert tiles.max() <= 6
        most = max(most, int(tiles.max()))
        assert batch["num_real_tokens"].max() <= 16 * 7  # the tile budget closed these rows
    assert most >= 5


def test_max_samples_per_pack():
    cfg = config(max_samples_per_pack=2, num_epochs=1)
    counts = [b["num_samples"] for b in build_loader(cfg, dataset=synthetic(30), process_index=0,
                                                     process_count=1)]
    counts = np.concatenate(counts)
    assert counts.max() == 2


@pytest.mark.parametrize("algorithm", ["first_fit", "best_fit"])
def test_padding_fraction(algorithm):
    ds = grain.MapDataset.range(4000).map(lambda i: make_sample(i, lo=16, hi=256, max_tiles=0))
    cfg = config(packing=algorithm, pack_max_length=1024, pack_num_bins=64, batch_size=8, num_epochs=None)
    loader = build_loader(cfg, dataset=ds, process_index=0, process_count=1)
    frac = packing.padding_fraction(next(loader) for _ in range(30))
    print(f"{algorithm}: padding fraction {frac:.3%}")
    assert frac < 0.10


def test_padding_fraction_counts():
    b = dict(num_real_tokens=np.array([3, 4]), input_ids=np.zeros((2, 4)))
    assert math.isclose(packing.padding_fraction([b]), 1 / 8)
