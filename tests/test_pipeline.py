"""The loader: padded mode, resume, epoch reshuffle, process sharding, budgets (mmjax.data.pipeline)."""

import json
import types

import grain
import numpy as np
import pytest

from mmjax.data.pipeline import build_loader
from tests.test_packing import PAD, check_batch, config, make_sample, segments, synthetic


def ids_of(batch):
    return [i for b in range(batch["input_ids"].shape[0]) for i, _ in segments(batch, b)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_padded_mode():
    cfg = config(packing="none", batch_size=3, num_epochs=1, drop_remainder=False, loss_reduction="square")
    n, seen, shapes = 10, [], set()
    for batch in build_loader(cfg, dataset=synthetic(n), process_index=0, process_count=1):
        shapes.add(batch["input_ids"].shape)
        seen += check_batch(batch, cfg, "square")
        assert batch["num_samples"].max() <= 1
    assert shapes == {(3, 256)}  # static, the short last batch filled with an empty row
    assert sorted(seen) == list(range(n))


def test_short_last_batch_is_padded_with_empty_rows():
    cfg = config(packing="none", batch_size=4, num_epochs=1, drop_remainder=False)
    batches = list(build_loader(cfg, dataset=synthetic(6), process_index=0, process_count=1))
    assert len(batches) == 2
    last = batches[-1]
    np.testing.assert_array_equal(last["num_samples"], [1, 1, 0, 0])
    assert np.all(last["input_ids"][2:] == PAD) and np.all(last["loss_weights"][2:] == 0)
    assert np.all(last["image_flags"].reshape(4, -1)[2:] == 0)
    dropped = list(build_loader(config(packing="none", batch_size=4, num_epochs=1), dataset=synthetic(6),
                                process_index=0, process_count=1))
    assert len(dropped) == 1


@pytest.mark.parametrize("packing,bins", [("first_fit", 4), ("best_fit", 16), ("none", 1)])
def test_resume_is_exact(packing, bins):
    # 24 samples ~ 2-3 batches per epoch: the checkpoints below fall mid-epoch, mid packing round
    # (16 bins) and across epoch boundaries.
    cfg = config(packing=packing, pack_num_bins=bins, num_epochs=None)
    ds = synthetic(24)
    ref_loader = build_loader(cfg, dataset=ds, process_index=0, process_count=1)
    states, ref = [], []
    for _ in range(10):
        states.append(json.loads(json.dumps(ref_loader.get_state())))
        ref.append(next(ref_loader))
    for k in (0, 1, 4, 7):
        loader = build_loader(cfg, dataset=ds, process_index=0, process_count=1)
        loader.set_state(states[k])
        for j in range(k, min(k + 3, 10)):
            assert_batches_equal(next(loader), ref[j])
    assert ids_of(ref[1]) != ids_of(ref[0])


def test_set_state_rejects_other_process_layout():
    cfg = config()
    state = build_loader(cfg, dataset=synthetic(8), process_index=0, process_count=1).get_state()
    other = build_loader(cfg, dataset=synthetic(8), process_index=1, process_count=2)
    with pytest.raises(ValueError):
        other.set_state(state)


def epoch_orders(seed, n=12, epochs=3):
    cfg = config(packing="none", batch_size=1, num_epochs=epochs)
    loader = build_loader(cfg, dataset=synthetic(n), process_index=0, process_count=1, epoch_seed=seed)
    order = [ids_of(b)[0] for b in loader]
    assert len(order) == n * epochs
    return [order[e * n:(e + 1) * n] for e in range(epochs)]


def test_epoch_reshuffle_reproducible():
    a = epoch_orders(seed=5)
    for e in a:
        assert sorted(e) == list(range(12))  # every epoch is a permutation of the dataset
    assert a[0] != a[1] and a[1] != a[2]  # a new order each epoch
    assert a == epoch_orders(seed=5)  # reproducible from the seed
    assert a != epoch_orders(seed=6)


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_sample_sharding_disjoint_and_complete(packing):
    cfg = config(packing=packing, batch_size=4, num_epochs=2, drop_remainder=False)
    n, per_process = 30, []
    for p in range(2):
        seen = []
        for batch in build_loader(cfg, dataset=synthetic(n), process_index=p, process_count=2):
            assert batch["input_ids"].shape[0] == 2  # half of the global rows
            seen += check_batch(batch, cfg)
        per_process.append(seen)
    both = per_process[0] + per_process[1]
    assert sorted(both) == sorted(list(range(n)) * 2)  # every sample once per epoch overall
    # disjoint within each epoch: stream positions p, p+2, ... of the same global shuffled order
    single = []
    for batch in build_loader(config(packing="none", batch_size=1, num_epochs=2), dataset=synthetic(n),
                              process_index=0, process_count=1):
        single += ids_of(batch)
    assert sorted(per_process[0]) == sorted(single[0::2])
    assert sorted(per_process[1]) == sorted(single[1::2])


def test_row_sharding_equals_global_batch():
    cfg = config(batch_size=4, shard_mode="rows", num_epochs=None)
    ds = synthetic(40)
    full = build_loader(cfg, dataset=ds, process_index=0, process_count=1)
    parts = [build_loader(cfg, dataset=ds, process_index=p, process_count=2) for p in range(2)]
    for _ in range(4):
        g = next(full)
        a, b = next(parts[0]), next(parts[1])
        assert a["input_ids"].shape == (2, 512) and a["pixel_values"].shape[0] == 2 * 6
        assert not set(ids_of(a)) & set(ids_of(b))
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    # rows-mode state is layout independent: a 2-process state resumes a 1-process loader
    state = parts[0].get_state()
    nxt = next(full)
    again = build_loader(cfg, dataset=ds, process_index=0, process_count=1)
    again.set_state(state)
    assert_batches_equal(next(again), nxt)


def oversize_dataset():
    def make(i):
        s = make_sample(i, lo=16, hi=64)
        if i == 3:  # 600 tokens > pack_max_length 512
            s["input_ids"] = np.full(600, 1003, np.int32)
            s["labels"] = s["input_ids"].copy()
            s["pixel_values"], s["image_flags"] = s["pixel_values"][:0], s["image_flags"][:0]
        if i == 5:  # 7 tiles > max_tiles_per_pack 6
            s["pixel_values"] = np.ones((7, 4, 4, 3), np.float32)
            s["image_flags"] = np.ones(7, np.int32)
        return s
    return grain.MapDataset.range(10).map(make)


def test_oversize_sample_is_an_error_by_default():
    loader = build_loader(config(num_epochs=1, shuffle=False), dataset=oversize_dataset(),
                          process_index=0, process_count=1)
    with pytest.raises(ValueError, match="'s3' has 600 tokens"):
        list(loader)


@pytest.mark.parametrize("packing", ["first_fit", "none"])
def test_oversize_sample_is_counted_when_skipped(packing):
    cfg = config(packing=packing, max_length=512, num_epochs=1, on_oversize="skip", drop_remainder=False)
    loader = build_loader(cfg, dataset=oversize_dataset(), process_index=0, process_count=1)
    seen = [i for batch in loader for i in ids_of(batch)]
    assert sorted(seen) == [0, 1, 2, 4, 6, 7, 8, 9]
    assert loader.num_skipped == 2


def test_pad_id_from_tokenizer_never_zero_by_default():
    cfg = config(packing="none", pad_token_id=None, num_epochs=1)
    tok = types.SimpleNamespace(pad_token_id=11)
    batch = next(build_loader(cfg, tok, dataset=synthetic(4), process_index=0, process_count=1))
    assert np.all(batch["input_ids"][batch["segment_ids"] == 0] == 11)
    with pytest.raises(ValueError, match="pad id"):
        build_loader(cfg, types.SimpleNamespace(pad_token_id=None), dataset=synthetic(4),
                     process_index=0, process_count=1)


def test_worker_processes_match_in_process_and_resume():
    ds = grain.MapDataset.range(30).map(make_sample)
    with build_loader(config(num_workers=0), dataset=ds, process_index=0, process_count=1) as local:
        want = [next(local) for _ in range(4)]
    cfg = config(num_workers=1, read_threads=1)
    with build_loader(cfg, dataset=ds, process_index=0, process_count=1) as loader:
        for j in range(2):
            assert_batches_equal(next(loader), want[j])
        state = json.loads(json.dumps(loader.get_state()))
    with build_loader(cfg, dataset=ds, process_index=0, process_count=1) as loader:
        loader.set_state(state)
        for j in range(2, 4):
            assert_batches_equal(next(loader), want[j])
