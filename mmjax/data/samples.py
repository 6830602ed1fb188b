"""Record -> processed sample, skip policy, ``build_dataset`` and the ``check`` pass.

Validation happens in two places:
  * up front, text only, over every record of every source (``mmjax.data.sources``): malformed JSON, unknown
    role, empty turn, no assistant turn, placeholder count != image count, missing image file;
  * lazily, when a sample is built: unreadable image, too long after truncation (truncation would leave no
    supervised token), zero supervised tokens.
A sample that cannot fit one row of the loader (``data.config.row_budget``) is found up front where the
record alone shows it (more images or frames than tiles a row holds), else when it is built; by
``data.on_oversize`` it is an error naming its file:line ('error', before step 1 where it can be) or
one more counted skip ('skip').
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
from mmjax.data import video as video_lib
from mmjax.data import xcomposer as xc_data
from mmjax.data.batch import IGNORE_INDEX
from mmjax.data.config import row_budget, validate_data_config
from mmjax.data.sources import load_sources
from mmjax.errors import DataError, UserError


class SampleError(Exception):
    """A record that cannot become a training sample; the message is the reason."""


class OversizeError(SampleError):
    """A sample that cannot fit one row of the loader (``data.on_oversize`` decides its fate)."""


class SkipBudgetExceeded(UserError, RuntimeError):
    """More samples were skipped than data.max_skip_fraction allows."""


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


def video_frames(cfg, record, rng, limits) -> tuple[list[str], list | None]:
    """The frames a video record's sample takes (``mmjax.data.video``): (their names, their decoded
    images), or (the picked frame files, None) for a frame list. An unreadable video file is a
    ``SampleError`` naming it."""
    if isinstance(record.video, list):
        n = len(record.video)
        picks = video_lib.segment_frames(n, video_lib.frame_count_to_take(cfg, n, rng, limits), rng)
        return [record.video[i] for i in picks], None
    try:
        n = video_lib.frame_count(record.video, record.clip)
        if n == 0:
            raise video_lib.VideoError(f"no frames in {record.video}"
                                       + (f" within clip {list(record.clip)}" if record.clip else ""))
        picks = video_lib.segment_frames(n, video_lib.frame_count_to_take(cfg, n, rng, limits), rng)
        images = video_lib.decode_frames(record.video, picks, record.clip)
    except video_lib.VideoError as e:
        raise SampleError(str(e)) from None
    return [f"{record.video} frame {i}" for i in picks], images


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
        self.row_tokens, self.row_tiles = row_budget(cfg)
        self.xcomposer = None
        if cfg.template == xc_data.TEMPLATE:     # InternLM-XComposer2: its own text and image tokens
            self.xcomposer = xc_data.XComposerTokens(tokenizer)
            return
        self.ctx = tpl.TokenizeContext(tokenizer, cfg.num_image_token)
        self.template = tpl.get_template(cfg.template)

    def build(self, record, *, index=0, source_id=0, data_augment=False, max_dynamic_patch=None,
              with_info=False, verify_tokenization=False, random_frames=False, frame_limits=None):
        """The processed sample of ``record`` (and its ``SampleInfo``); ``SampleError`` when it cannot
        be trained on, ``OversizeError`` when it does not fit one row. ``random_frames``: a video's
        frames drawn as in training (``mmjax.data.video``); ``frame_limits``: its dataset's own."""
        if self.xcomposer is not None:
            sample, info = xc_data.build_sample(self.cfg, self.xcomposer, record, index=index, source_id=source_id)
        else:
            sample, info = self._build(record, index=index, source_id=source_id, data_augment=data_augment,
                                       max_dynamic_patch=max_dynamic_patch, verify_tokenization=verify_tokenization,
                                       random_frames=random_frames, frame_limits=frame_limits)
        n, k = int(sample["num_tokens"]), int(len(sample["pixel_values"]))
        if n > self.row_tokens or k > self.row_tiles:
            raise OversizeError(f"over the row budget: {n} tokens and {k} tiles, a row holds {self.row_tokens} "
                                f"tokens and {self.row_tiles} tiles")
        return (sample, info) if with_info else sample

    def _build(self, record, *, index, source_id, data_augment, max_dynamic_patch, verify_tokenization,
               random_frames, frame_limits):
        cfg = self.cfg
        if record.error:
            raise SampleError(record.error)
        aug_rng = np.random.default_rng([int(cfg.seed), int(index)]) if data_augment else None
        messages = list(record.messages)
        paths, decoded = record.images, None
        pixel_chunks, grids, sizes, tiles = [], [], [], []
        if record.video is not None:
            frames_rng = np.random.default_rng([int(cfg.seed), int(index), 1]) if random_frames else None
            paths, decoded = video_frames(cfg, record, frames_rng, frame_limits)
            messages = expand_video_placeholder(messages, len(paths))
            budget, dynamic = 1, False
        else:
            mdp = int(max_dynamic_patch or cfg.max_dynamic_patch)
            budget = max(1, mdp // len(paths)) if len(paths) > 1 else mdp
            dynamic = bool(cfg.dynamic_image_size)
        for j, p in enumerate(paths):
            im = decoded[j] if decoded is not None else load_record_image(p, cfg.get("alpha", "white"))
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
        return sample, SampleInfo(segments, list(paths), grids, sizes, list(tiles), truncated, matches)


OVERSIZE_ADVICE = ("raise data.pack_max_length / data.max_tiles_per_pack, or set data.on_oversize='skip' "
                   "to skip such samples (counted)")


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
        oversize = []
        for sid, s in enumerate(self.sources):
            bad = np.zeros(len(s.records), bool)
            for k, r in enumerate(s.records):
                if not r.error:
                    r.error = self._oversize_up_front(r)
                    if r.error:
                        oversize.append(r)
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
        if oversize and mode == "train" and self._on_oversize() == "error":
            raise DataError(f"{oversize[0].where}: {oversize[0].error}"
                            + (f" (and {len(oversize) - 1} more records)" if len(oversize) > 1 else "")
                            + f"; {OVERSIZE_ADVICE}")
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

    def _on_oversize(self) -> str:
        return self.cfg.get("on_oversize", "error")

    def _oversize_up_front(self, rec) -> str | None:
        """Why ``rec`` can never fit one row, from the record alone (every image and video frame is
        at least one tile), else None; the rest is found when the sample is built."""
        if isinstance(rec.video, list):   # a video file's frame count is known once it is opened
            fewest = (int(self.cfg.get("min_num_frame", 8)) if int(self.cfg.get("max_num_frame", 0)) > 0
                      else int(self.cfg.num_video_frames))
            n = min(len(rec.video), fewest)
        else:
            n = 0 if rec.video is not None else len(rec.images)
        if n > self.builder.row_tiles:
            what = "video frames" if rec.video is not None else "images"
            return (f"over the row budget: {n} {what}, at least {n} tiles, a row holds {self.builder.row_tiles} "
                    f"(data.max_tiles_per_pack)")
        return None

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
                                      max_dynamic_patch=s.max_dynamic_patch, random_frames=self.mode == "train",
                                      frame_limits=s.frame_limits)
        except OversizeError as e:
            if self._on_oversize() == "error":
                raise DataError(f"{rec.where}: {e}; {OVERSIZE_ADVICE}") from None
            return self._skipped(i, rec, e)
        except SampleError as e:
            return self._skipped(i, rec, e)

    def _skipped(self, i, rec, e):
        """Count the failed sample ``i`` (once) and return grain's None."""
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
