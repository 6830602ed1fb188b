"""Video: which frames a sample takes, and reading them from a video file (PyAV) or a frame list.

A video becomes ``n`` frames, one tile each, and the prompt's ``<video>`` becomes
``Frame-1: <image>\\nFrame-2: <image>\\n...`` (``mmjax.data.samples``). The frames are picked as
upstream InternVL picks them (facts in the reference notes; the code is this project's):

  * ``data.max_num_frame`` 0 (the base default): a fixed ``data.num_video_frames``, the middle
    frame of as many equal segments (upstream's evaluation rule), everywhere;
  * ``data.max_num_frame`` > 0 (the InternVL fine-tune configs, upstream's 8-32): in training a
    count drawn in ``[min_num_frame, max_num_frame]`` and one frame drawn in each of as many equal
    segments (upstream's ``rand`` rule); ``check`` and ``show`` keep the fixed rule. The draw is
    seeded by the data seed and the sample's index, so a resumed run sees the same frames;
    upstream draws afresh every time the sample is read.

Both are capped at the frames the video has. A meta entry may set ``min_num_frame`` /
``max_num_frame`` for its dataset. A record's ``clip: [start, end]`` (seconds) keeps the frames
shown in that span. Video files are decoded with PyAV (FFmpeg's demuxers and decoders): counting
frames reads packets only, then one decoding pass converts just the picked frames to RGB.
"""

from __future__ import annotations

import numpy as np

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".ts",
              ".gif")


class VideoError(Exception):
    """A video file that cannot be read (its message names the file and the reason)."""


def is_video_file(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTS)


def segment_frames(n_frames: int, num: int, rng: np.random.Generator | None = None) -> list[int]:
    """``num`` frame indices of ``n_frames``: ``n_frames`` cut into ``num`` equal segments, the
    middle frame of each, or (``rng``) one drawn uniformly in each; every frame when there are
    fewer than ``num``."""
    if n_frames <= num:
        return list(range(n_frames))
    seg = n_frames / num
    if rng is None:
        return [min(n_frames - 1, int(seg / 2 + seg * i)) for i in range(num)]
    bounds = [int(round(seg * i)) for i in range(num + 1)]
    return [int(rng.integers(lo, max(lo + 1, hi))) for lo, hi in zip(bounds[:-1], bounds[1:])]


def frame_count_to_take(cfg, n_frames: int, rng: np.random.Generator | None, limits=None) -> int:
    """How many frames a sample takes (see the module docstring); ``limits``: a dataset's own
    (min_num_frame, max_num_frame), None entries falling back to the config's."""
    lo, hi = limits or (None, None)
    lo = int(cfg.get("min_num_frame", 8) if lo is None else lo)
    hi = int(cfg.get("max_num_frame", 0) if hi is None else hi)
    if rng is None or hi <= 0:
        return min(n_frames, int(cfg.num_video_frames))
    return min(n_frames, int(rng.integers(min(lo, hi), hi + 1)))


def _open(path: str):
    import av
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"cannot open video {path}: {type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"no video stream in {path}")
    return container


def _in_clip(t: float | None, clip) -> bool:
    return clip is None or (t is not None and clip[0] <= t <= clip[1])


def frame_count(path: str, clip=None) -> int:
    """The number of frames of the video file (in ``clip`` seconds when given), from its packets."""
    import av
    container = _open(path)
    try:
        stream = container.streams.video[0]
        n = 0
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None and _in_clip(float(packet.pts * stream.time_base), clip):
                n += 1
        return n
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video {path}: {type(e).__name__}: {e}") from None
    finally:
        container.close()


def decode_frames(path: str, indices: list[int], clip=None) -> list:
    """The frames at ``indices`` (distinct, in shown order within ``clip``) of a video file as RGB PIL
    images."""
    import av
    want = {i: k for k, i in enumerate(indices)}
    out = [None] * len(indices)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        shown = -1
        last = None
        for frame in container.decode(stream):
            if not _in_clip(frame.time, clip):
                continue
            shown += 1
            last = frame
            if shown in want:
                out[want[shown]] = frame.to_image()
            if shown >= max(indices):
                break
    except av.FFmpegError as e:
        raise VideoError(f"cannot decode video {path}: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    if last is None:
        raise VideoError(f"no frames decoded from {path}" + (f" in clip {list(clip)}" if clip else ""))
    # a container may count a packet more than it shows frames: the last frame stands in
    tail = last.to_image() if any(x is None for x in out) else None
    return [x if x is not None else tail for x in out]
