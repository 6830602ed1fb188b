"""Record -> processed sample, skip policy, ``build_dataset`` and the ``check`` pass.

Validation happens in two places:
  * up front, text only, over every record of every source (``mmjax.data.sources``): malformed JSON, unknown
    role, empty turn, no assistant turn, placeholder count != image count, missing image file;
  * lazily, when a sample is built: unreadable image, too long after truncation (truncation would leave no
    supervised token), zero supervised tokens.
Training mode drops records that failed up front from the index (counted), and a lazily failing sample
becomes ``None`` (grain's convention for a filtered element; counted per process). When the skipped count
exceeds ``max_skip_fraction`` x the number of samples the run stops with a ``SkipBudgetExceeded`` error.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np
from absl import logging

from mmjax.data import images as img_lib
from mmjax.data import templates as tpl
from mmjax.data import xcomposer as xc_data
from mmjax.data.batch import IGNORE_INDEX
from mmjax.data.config import validate_data_config
from mmjax.data.sources import load_sources


class SampleError(Exception):
    """A record that cannot become a training sample; the message is the reason."""


class SkipBudgetExceeded(RuntimeError):
    pass


@dataclasses.dataclass
class SampleInfo:
    """Extra facts about one built sample (for ``show`` / ``check``)."""
    segments: list
    image_paths: list
    grids: list              # per image: (cols, rows); (1, 1) for video frames
    image_sizes: list        # per image: (W, H)
    tiles_per_image: list
    truncated: bool
    matches_whole: bool | None = None


def video_frame_indices(n_frames, num):
    """``num`` frames evenly spread (middle of equal segments); all frames when there are fewer."""
    if n_frames <= num:
        return list(range(n_frames))
    seg = n_frames / num
    return [min(n_frames - 1, int(seg / 2 + seg * i)) for i in range(num)]


def expand_video_placeholder(messages, n_frames):
    special = "\n".join(f"Frame-{i + 1}: <image>" for i in range(n_frames))
    out = []
    for role, text in messages:
        if "<video>" in text:
            text = text.replace("<video>\n", special + "\n").replace("<video>", special)
        out.append((role, text))
    return out


def load_record_image(path, alpha="white"):
    """A record's image as RGB; a missing or unreadable file is a ``SampleError`` naming it."""
    try:
        return img_lib.load_image(path, alpha=alpha)
    except FileNotFoundError:
        raise SampleError(f"missing image: {path}") from None
    except Exception as e:
        raise SampleError(f"unreadable image {path}: {type(e).__name__}: {e}") from None


class SampleBuilder:
    def __init__(self, cfg, tokenizer):
        self.cfg = cfg
        self.xcomposer = None
        if cfg.template == xc_data.TEMPLATE:     # InternLM-XComposer2: its own text and image tokens
            self.xcomposer = xc_data.XComposerTokens(tokenizer)
            return
        self.ctx = tpl.TokenizeContext(tokenizer, cfg.num_image_token)
        self.template = tpl.get_template(cfg.template)

    def build(self, record, *, index=0, source_id=0, data_augment=False, max_dynamic_patch=None,
              with_info=False, verify_tokenization=False):
        cfg = self.cfg
        if self.xcomposer is not None:
            sample, info = xc_data.build_sample(cfg, self.xcomposer, record, index=index, source_id=source_id)
            return (sample, info) if with_info else sample
        if record.error:
            raise SampleError(record.error)
        aug_rng = np.random.default_rng([int(cfg.seed), int(index)]) if data_augment else None
        messages = list(record.messages)
        paths = record.images
        pixel_chunks, grids, sizes, tiles = [], [], [], []
        if record.video is not None:
            picks = video_frame_indices(len(record.video), int(cfg.num_video_frames))
            paths = [record.video[i] for i in picks]
            messages = expand_video_placeholder(messages, len(paths))
            budget, dynamic = 1, False
        else:
            mdp = int(max_dynamic_patch or cfg.max_dynamic_patch)
            budget = max(1, mdp // len(paths)) if len(paths) > 1 else mdp
            dynamic = bool(cfg.dynamic_image_size)
        for p in paths:
            im = load_record_image(p, cfg.get("alpha", "white"))
            pv, grid = img_lib.process_image(
                im, min_num=min(int(cfg.min_dynamic_patch), budget), max_num=budget, image_size=int(cfg.image_size),
                use_thumbnail=bool(cfg.use_thumbnail), dynamic=dynamic, normalize_type=cfg.normalize_type,
                augment_rng=aug_rng)
            pixel_chunks.append(pv)
            grids.append(grid)
            sizes.append(im.size)
            tiles.append(pv.shape[0])
        segments = tpl.render_segments(self.template, messages, cfg.get("system_message") or None)
        try:
            input_ids, labels = tpl.tokenize_segments(self.ctx, segments, tiles)
        except ValueError as e:
            raise SampleError(str(e)) from None
        matches = (tpl.matches_whole_tokenization(self.ctx, segments, tiles, input_ids)
                   if verify_tokenization else None)
        truncated = False
        max_len = int(cfg.max_length)
        if len(input_ids) > max_len:
            truncated = True
            cut = max_len
            starts = np.flatnonzero(input_ids == self.ctx.img_start)
            ends = np.flatnonzero(input_ids == self.ctx.img_end)
            for s, e in zip(starts, ends):
                if s < cut <= e:  # the cut would split this image block: cut before its <img>
                    cut = int(s)
                    break
            input_ids, labels = input_ids[:cut], labels[:cut]
            kept = int(np.sum(ends < cut))
            pixel_chunks, tiles = pixel_chunks[:kept], tiles[:kept]
        n_sup = int(np.sum(labels != IGNORE_INDEX))
        if n_sup == 0:
            if truncated:
                raise SampleError(f"too long after truncation: no supervised token within max_length={max_len}")
            raise SampleError("zero supervised tokens")
        size = int(cfg.image_size)
        if pixel_chunks:
            pixel_values = np.concatenate(pixel_chunks, axis=0)
            flags = np.ones(len(pixel_values), np.int32)
        elif cfg.get("dummy_image_for_text", False):
            pixel_values = img_lib.white_tile(cfg.normalize_type, size)
            flags = np.zeros(1, np.int32)
        else:
            pixel_values = np.zeros((0, size, size, 3), np.float32)
            flags = np.zeros(0, np.int32)
        sample = {
            "input_ids": input_ids.astype(np.int32),
            "labels": labels.astype(np.int32),
            "pixel_values": pixel_values.astype(np.float32, copy=False),
            "image_flags": flags,
            "num_tiles": int(len(flags)),
            "num_images": int(len(tiles)),
            "num_tokens": int(len(input_ids)),
            "num_supervised": n_sup,
            "source": record.source,
            "source_id": int(source_id),
            "index": int(index),
        }
        if with_info:
            return sample, SampleInfo(segments, list(paths), grids, sizes, list(tiles), truncated, matches)
        return sample


class SampleSource:
    """Random-access source of processed samples (``None`` for a sample skipped at build time)."""

    def __init__(self, cfg, tokenizer, mode="train"):
        validate_data_config(cfg)
        self.cfg = cfg
        self.mode = mode
        self.builder = SampleBuilder(cfg, tokenizer)
        self.sources = load_sources(cfg)
        self.upfront_skips = collections.Counter()
        self.bad_records = []  # (where, reason), each bad record once
        src_ids, rec_ids = [], []
        total = 0
        for sid, s in enumerate(self.sources):
            bad = np.zeros(len(s.records), bool)
            for k, r in enumerate(s.records):
                if r.error:
                    bad[k] = True
                    self.bad_records.append((r.where, r.error))
            total += len(s.order)
            keep = s.order[~bad[s.order]] if len(s.order) else s.order
            for k in s.order[bad[s.order]] if len(s.order) else []:
                self.upfront_skips[_reason_key(s.records[k].error)] += 1
            src_ids.append(np.full(len(keep), sid, np.int32))
            rec_ids.append(keep.astype(np.int64))
        self.total_samples = total
        self._src = np.concatenate(src_ids) if src_ids else np.zeros(0, np.int32)
        self._rec = np.concatenate(rec_ids) if rec_ids else np.zeros(0, np.int64)
        self.lazy_skips = collections.Counter()
        self._failed: set[int] = set()   # epoch indices whose sample failed to build (counted once)
        self._lock = threading.Lock()
        n_up = sum(self.upfront_skips.values())
        if n_up:
            logging.warning("mmjax.data: %d of %d samples skipped up front: %s", n_up, total,
                            dict(self.upfront_skips))
        if mode == "train":
            self._check_budget()

    def __len__(self):
        return len(self._src)

    def record(self, i):
        s = self.sources[int(self._src[i])]
        return s, s.records[int(self._rec[i])]

    def __getitem__(self, i):
        i = int(i)
        sid = int(self._src[i])
        s = self.sources[sid]
        rec = s.records[int(self._rec[i])]
        try:
            return self.builder.build(rec, index=i, source_id=sid, data_augment=s.data_augment or
                                      bool(self.cfg.get("data_augment", False)) and s.fmt != "internvl",
                                      max_dynamic_patch=s.max_dynamic_patch)
        except SampleError as e:
            with self._lock:   # a sample counts once, however often it is built (start-up probe, epochs)
                first = i not in self._failed
                if first:
                    self._failed.add(i)
                    self.lazy_skips[_reason_key(str(e))] += 1
            if first:
                logging.warning("mmjax.data: skipped %s: %s", rec.where, e)
            if self.mode == "train":
                self._check_budget()
            return None

    def skipped(self):
        return sum(self.upfront_skips.values()) + sum(self.lazy_skips.values())

    def skip_summary(self):
        parts = collections.Counter(self.upfront_skips) + collections.Counter(self.lazy_skips)
        detail = ", ".join(f"{k}: {v}" for k, v in parts.most_common())
        return (f"{self.skipped()} of {self.total_samples} samples skipped"
                + (f" ({detail})" if detail else ""))

    def _check_budget(self):
        limit = float(self.cfg.max_skip_fraction) * max(1, self.total_samples)
        if self.skipped() > limit:
            raise SkipBudgetExceeded(
                f"mmjax.data: {self.skip_summary()} exceeds data.max_skip_fraction="
                f"{self.cfg.max_skip_fraction}; run `python -m mmjax.data check` to list the bad records")

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _reason_key(reason):
    """Group reasons for the summary: the text before the first ':' or digit-laden detail."""
    key = reason.split(":")[0]
    return " ".join(w for w in key.split() if not any(ch.isdigit() for ch in w)) or key


def build_dataset(cfg, tokenizer, mode="train"):
    """``config.data`` + a transformers tokenizer -> grain ``MapDataset`` of processed, unpacked samples.

    Elements are dicts (see ``SampleBuilder.build``) or ``None`` for a sample skipped at build time.
    The underlying ``SampleSource`` (skip counters, records) is reachable as ``dataset.mmjax_source``.
    """
    import grain
    source = SampleSource(cfg, tokenizer, mode=mode)
    ds = grain.MapDataset.source(source)
    ds.mmjax_source = source
    return ds


# ----------------------------------------------------------------------------------------------- check


@dataclasses.dataclass
class SourceStats:
    name: str
    file: str
    records: int = 0
    samples: int = 0          # per epoch, after repeat / sampling
    bad: int = 0
    images: int = 0           # per epoch
    tiles: int = 0
    tokens: int = 0
    supervised: int = 0
    truncated: int = 0
    boundary_mismatch: int = 0


def run_check(cfg, tokenizer, progress=None):
    """Build every distinct record of every source. Returns (list of SourceStats, bad list, warnings).

    bad: list of (where, reason) for every record that training would skip. Per-epoch totals weight each
    record by how often the epoch index uses it.
    """
    src = SampleSource(cfg, tokenizer, mode="check")
    stats, bad, warnings = [], [], []
    for sid, s in enumerate(src.sources):
        st = SourceStats(s.name, s.file, records=len(s.records), samples=len(s.order))
        mult = np.bincount(s.order, minlength=len(s.records)) if len(s.records) else np.zeros(0, np.int64)
        for k, rec in enumerate(s.records):
            try:
                sample, info = src.builder.build(rec, index=k, source_id=sid, data_augment=False,
                                                 max_dynamic_patch=s.max_dynamic_patch, with_info=True,
                                                 verify_tokenization=True)
            except SampleError as e:
                st.bad += 1
                bad.append((rec.where, str(e)))
                continue
            m = int(mult[k])
            st.images += m * sample["num_images"]
            st.tiles += m * int(np.sum(sample["image_flags"]))
            st.tokens += m * sample["num_tokens"]
            st.supervised += m * sample["num_supervised"]
            st.truncated += m * int(info.truncated)
            if info.matches_whole is False:
                st.boundary_mismatch += 1
            if progress:
                progress(s.name, k)
        if st.boundary_mismatch:
            warnings.append(f"{s.name}: {st.boundary_mismatch} records tokenize differently segment by segment "
                            "than as one string (labels stay exact; usually an answer starting with whitespace)")
        stats.append(st)
    ct = _chat_template_warning(cfg, tokenizer, src)
    if ct:
        warnings.append(ct)
    return stats, bad, warnings


def _chat_template_warning(cfg, tokenizer, src):
    """Compare the rendering of one text record with the tokenizer's own chat template, when it has one."""
    if not getattr(tokenizer, "chat_template", None) or cfg.template not in ("qwen3", "internvl2_5"):
        return None
    for s in src.sources:
        for rec in s.records:
            if rec.error or rec.images or rec.video is not None:
                continue
            ours = tpl.render_text(cfg.template, rec.messages, cfg.get("system_message") or None)
            try:
                theirs = tpl.chat_template_text(tokenizer, rec.messages)
            except Exception as e:  # a template that rejects the messages
                return f"chat template could not render {rec.where}: {e}"
            if theirs is not None and theirs != ours:
                return (f"template {cfg.template!r} renders {rec.where} differently from the tokenizer's "
                        f"chat template:\n  ours:   {ours!r}\n  theirs: {theirs!r}")
            return None
    return None
