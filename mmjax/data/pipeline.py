"""The training loader: shuffle -> process in workers -> pack -> batch -> shard by process.

    loader = build_loader(config.data, tokenizer)
    batch = next(loader)                    # dict of numpy arrays, static shapes
    state = loader.get_state()              # JSON-serialisable; save beside the train state
    loader = build_loader(config.data, tokenizer); loader.set_state(state)   # resumes exactly

Stages (grain):
  1. ``MapDataset`` of processed samples (``mmjax.data.build_dataset``; lazy, so decoding runs later).
  2. ``.shuffle(seed).repeat(num_epochs)``: a different permutation every epoch, epoch e seeded by
     ``seed + e`` (grain's index shuffle), reproducible from the seed alone.
  3. Shard by process (``shard_mode='samples'``): process p keeps positions p, p+P, ... of the global
     shuffled stream. Disjoint, and together they cover every epoch exactly once.
  4. ``prepare_sample`` (dtypes, loss weights) and the dataset's own decode/tile/tokenize maps run in
     ``num_workers`` grain worker processes (``mp_prefetch``; 0 = in this process).
  5. Budget check (error, or a counted skip; never truncation), then grain first-fit / best-fit
     packing with a token budget and a tile budget per row (``mmjax.data.packing``), or one padded
     sample per row (``packing='none'``).
  6. Batch ``batch_size // process_count`` rows; a short last batch is filled with empty rows.

Batch (B = rows on this process, T = pack_max_length, or max_length when packing='none',
K = max_tiles_per_pack, H = W = image_size):

    input_ids      (B, T) int32    padding = pad id (config pad_token_id, else tokenizer.pad_token_id)
    labels         (B, T) int32    ALIGNED with input_ids (not shifted; the loss shifts); -100 = ignore.
                                   The first label of every sample is -100 (nothing precedes it), so a
                                   shifted loss never predicts across a packed-sample boundary.
    segment_ids    (B, T) int32    0 = padding, 1..n = n-th sample of the row
    positions      (B, T) int32    0.. restarting for every sample; 0 on padding
    loss_weights   (B, T) float32  InternVL len2weight per sample (token: 1, sample: 1/x, square:
                                   1/sqrt(x), x = supervised tokens of the sample), 0 where labels == -100.
                                   Aligned with labels. NOT normalised: the trainer computes
                                   sum(w * CE) / sum(w), both sums over the whole GLOBAL batch.
    pixel_values   (B*K, H, W, 3) float32  row b owns [b*K, (b+1)*K): its real tiles first, in the order
                                   their <IMG_CONTEXT> tokens appear in the row, then zero tiles
    image_flags    (B*K,) int32    1 real tile, 0 padding tile
    num_samples, num_real_tokens, num_supervised_tokens   (B,) int32 per-row stats

Process sharding: ``shard_mode='samples'`` (default) shards the sample stream before the workers,
so each process decodes only its 1/P of the data and packs it on its own. Its rows are therefore
not a slice of what a single process would pack; the equivalent guarantee is that in every epoch
the processes' samples are disjoint and their union is the dataset. ``shard_mode='rows'`` has
every process run the whole global pipeline and keep rows [p*B, (p+1)*B) of each global batch:
the union of the processes' rows IS the single-process global batch (and the iterator state is
the same on every process), at P times the decoding cost.

With a finite ``num_epochs`` and shard_mode='samples', processes may run out after different
numbers of batches; multi-host training should use ``num_epochs=None`` and a step count.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import grain
import numpy as np

from mmjax.data import packing as packing_lib
from mmjax.data.xcomposer import TEMPLATE as XCOMPOSER_TEMPLATE

STATE_FORMAT = "mmjax.loader/1"

DEFAULTS = dict(
    packing="first_fit",        # 'first_fit' | 'best_fit' | 'none' (one padded sample per row)
    pack_num_bins=64,           # grain packer bins (rows packed per round)
    max_samples_per_pack=None,  # cap on samples per row (e.g. for kernels with static segment counts)
    loss_reduction="token",     # 'token' | 'sample' | 'square'
    num_workers=0,              # grain worker processes; 0 = decode in this process
    prefetch=2,                 # per-worker output buffer (samples)
    read_threads=1,             # threads per process reading/processing samples
    read_buffer=8,              # samples buffered by those threads
    drop_remainder=True,        # False: the short last batch is filled with empty rows
    shuffle=True,
    num_epochs=None,            # None = repeat forever
    pad_token_id=None,          # None: tokenizer.pad_token_id
    on_oversize="error",        # 'error' | 'skip' (counted in loader.num_skipped)
    shard_mode="samples",       # 'samples' | 'rows' (see module docstring)
    seed=0,
)


def _cfg(config, key):
    value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
    return DEFAULTS.get(key) if value is None else value


def _required(config, key):
    value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
    if value is None:
        raise ValueError(f"data config needs '{key}'")
    return value


def resolve_pad_id(config, tokenizer) -> int:
    """Config ``pad_token_id`` if set, else the tokenizer's; never a guessed 0."""
    pad = _cfg(config, "pad_token_id")
    if pad is None and tokenizer is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("no pad id: set data.pad_token_id or pass a tokenizer with pad_token_id")
    return int(pad)


class Loader:
    """Iterator of batches (see module docstring) with checkpointable state."""

    def __init__(self, dataset: grain.IterDataset, budget: packing_lib.BudgetCheckIterDataset, *,
                 info: dict):
        self._dataset = dataset
        self._budget = budget
        self._iter = iter(dataset)
        self.info = info
        self.batch_size = info["batch_size"]          # rows on this process
        self.global_batch_size = info["global_batch_size"]
        self.seq_len = info["seq_len"]
        self.max_tiles = info["max_tiles"]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def close(self) -> None:
        """Stops worker processes and frees their shared memory (idempotent)."""
        self._iter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def num_skipped(self) -> int:
        """Over-budget samples dropped so far (on_oversize='skip'), including read-ahead."""
        return int(self._budget.stats["skipped"])

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable state; ``set_state`` on a loader built alike resumes after it."""
        return {"format": STATE_FORMAT, "shard": self._shard_key(),
                "grain": json.loads(json.dumps(self._iter.get_state()))}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state: {state.get('format')!r}")
        if state["shard"] != self._shard_key():
            raise ValueError(f"state was saved for {state['shard']}, this loader is {self._shard_key()}; "
                             "runs with config.data.shard_mode='rows' resume on any number of processes")
        self._iter.set_state(state["grain"])

    def _shard_key(self) -> dict:
        i = self.info
        if i["shard_mode"] == "rows":
            return {"shard_mode": "rows", "global_batch_size": i["global_batch_size"]}
        return {"shard_mode": "samples", "process_index": i["process_index"],
                "process_count": i["process_count"]}


def build_loader(data_config, tokenizer=None, *, dataset: grain.MapDataset | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 epoch_seed: int | None = None) -> Loader:
    """Builds the batch iterator for this process (see the module docstring for the layout).

    Args:
      data_config: ConfigDict (or any object with ``get``) holding ``batch_size`` (global rows),
        ``max_tiles_per_pack``, ``image_size``, ``pack_max_length`` (packed) or ``max_length``
        (packing='none'), and optionally the keys of ``DEFAULTS``.
      tokenizer: used for the pad id and passed to ``build_dataset``.
      dataset: a MapDataset of processed samples; default ``mmjax.data.build_dataset(...)``.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      epoch_seed: seed of the per-epoch shuffle and of the packer; default ``data_config.seed``.
    """
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if dataset is None:
        from mmjax.data import build_dataset
        dataset = build_dataset(data_config, tokenizer)

    mode = _cfg(data_config, "packing")
    shard_mode = _cfg(data_config, "shard_mode")
    if shard_mode not in ("samples", "rows"):
        raise ValueError(f"shard_mode must be 'samples' or 'rows', got {shard_mode!r}")
    seq_len = int(_required(data_config, "max_length" if mode == "none" else "pack_max_length"))
    max_tiles = int(_required(data_config, "max_tiles_per_pack"))
    size = int(_required(data_config, "image_size"))
    image_shape = (size, size, 3)
    global_bs = int(_required(data_config, "batch_size"))
    if global_bs % process_count:
        raise ValueError(f"batch_size {global_bs} is not divisible by process_count {process_count}")
    local_bs = global_bs // process_count
    seed = int(_cfg(data_config, "seed") if epoch_seed is None else epoch_seed)
    pad_id = resolve_pad_id(data_config, tokenizer)
    num_epochs = _cfg(data_config, "num_epochs")
    image_tokens = _cfg(data_config, "template") == XCOMPOSER_TEMPLATE   # XComposer2's per-token image arrays

    # 1-3: per-epoch shuffle, epochs, shard the sample stream.
    ds = dataset
    if _cfg(data_config, "shuffle"):
        ds = ds.shuffle(seed)
    ds = ds.repeat(None if num_epochs is None else int(num_epochs))
    if shard_mode == "samples" and process_count > 1:
        ds = ds[process_index::process_count]
    # 4: decode/tile/tokenize (the dataset's lazy maps) + prepare, in workers.
    ds = ds.map(functools.partial(packing_lib.prepare_sample,
                                  loss_reduction=_cfg(data_config, "loss_reduction"),
                                  image_shape=image_shape))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(_cfg(data_config, "read_threads")),
                                              prefetch_buffer_size=int(_cfg(data_config, "read_buffer"))))
    workers = int(_cfg(data_config, "num_workers"))
    if workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=int(_cfg(data_config, "prefetch"))))
    # 5: budgets, then pack (or pad).
    budget = packing_lib.BudgetCheckIterDataset(it, max_tokens=seq_len, max_tiles=max_tiles,
                                                on_oversize=_cfg(data_config, "on_oversize"))
    if mode == "none":
        it = budget.map(functools.partial(packing_lib.pad_row, max_tokens=seq_len, max_tiles=max_tiles,
                                          pad_id=pad_id, image_shape=image_shape))
    else:
        max_per_row = _cfg(data_config, "max_samples_per_pack")
        it = packing_lib.pack(budget, algorithm=mode, max_tokens=seq_len, max_tiles=max_tiles,
                              pad_id=pad_id, num_bins=int(_cfg(data_config, "pack_num_bins")), seed=seed,
                              max_samples_per_row=None if max_per_row is None else int(max_per_row),
                              image_tokens=image_tokens)
        it = it.map(functools.partial(packing_lib.finalize_row, max_tiles=max_tiles,
                                      image_shape=image_shape))
    # 6: batch (+ take this process's rows in shard_mode='rows').
    rows_per_batch = global_bs if shard_mode == "rows" else local_bs
    empty = packing_lib.empty_row(max_tokens=seq_len, max_tiles=max_tiles, pad_id=pad_id,
                                  image_shape=image_shape, image_tokens=image_tokens)
    it = it.batch(rows_per_batch, drop_remainder=bool(_cfg(data_config, "drop_remainder")),
                  batch_fn=functools.partial(packing_lib.collate, batch_size=rows_per_batch, empty=empty))
    if shard_mode == "rows" and process_count > 1:
        it = it.map(functools.partial(take_rows, start=process_index * local_bs, count=local_bs,
                                      max_tiles=max_tiles))
    info = dict(batch_size=local_bs, global_batch_size=global_bs, seq_len=seq_len, max_tiles=max_tiles,
                image_shape=image_shape, pad_id=pad_id, packing=mode, shard_mode=shard_mode,
                process_index=process_index, process_count=process_count, seed=seed)
    return Loader(it, budget, info=info)


def _ensure_absl_flags_parsed():
    """grain's worker start reads absl flags; outside ``app.run`` (scripts, tests) use their defaults."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def take_rows(batch: dict, *, start: int, count: int, max_tiles: int) -> dict:
    """Rows [start, start+count) of a batch, with their tiles."""
    out = {}
    for k, v in batch.items():
        if k in ("pixel_values", "image_flags"):
            out[k] = v[start * max_tiles:(start + count) * max_tiles]
        else:
            out[k] = v[start:start + count]
    return out
