"""Data sources: InternVL meta JSON + JSONL, XComposer2 JSON + data.txt, XTuner-style dataset lists.

Every source is read into canonical ``Record`` objects (text-level validation only: no image decoding) and
an index array saying which records make up one epoch (repeat_time / data.txt counts / sample_ratio).

Path rules: a relative path in a config / meta / data.txt file, and an XComposer record's image path, is
taken relative to the working directory when it exists there (as upstream, which launches from its repo's
``internvl_chat/`` or ``finetune/``), else relative to the first of the naming file's folder and the folders
above it where it exists (``_resolve``). InternVL / XTuner image paths inside records are joined to the
source root (``root`` / ``media_root``).

Reading rules: files are UTF-8; a UTF-8 byte-order mark at the start of a file is skipped; a JSONL
line (or a JSON-list element) holding bytes that are not UTF-8 is a bad record naming its file:line,
like malformed JSON. A per-dataset setting (meta ``repeat_time``, ``data_augment``,
``max_dynamic_patch``; a dataset list's ``sample_ratio``, ...) must have its JSON type: a boolean is
``true`` / ``false`` (or 0 / 1), a number is a number; a string there ("false", "6") is an error,
since Python reads ``"false"`` as true. ``null`` means the setting's default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib

import numpy as np
from absl import logging

from mmjax.data.video import VIDEO_EXTS, is_video_file
from mmjax.errors import DataError

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
            "system": "system"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class Record:
    source: str
    file: str
    line: int
    messages: list = dataclasses.field(default_factory=list)   # [(role, text)], roles system/user/assistant
    images: list = dataclasses.field(default_factory=list)     # resolved image paths
    video: list | str | None = None                            # resolved frame paths (all frames), or a video file
    clip: tuple | None = None                                  # (start, end) seconds of a video file
    error: str | None = None
    # the record's one image had no placeholder and "<image>\n" was put before the first user text
    # (XComposer2 puts such an image before the whole conversation instead)
    image_prepended: bool = False

    @property
    def where(self):
        return f"{self.file}:{self.line}"

    @property
    def kind(self):
        if self.video is not None:
            return "video"
        return {0: "text", 1: "image"}.get(len(self.images), "multi_image")


@dataclasses.dataclass
class Source:
    name: str
    fmt: str                      # internvl | xcomposer | xtuner
    file: str
    records: list
    order: np.ndarray             # record indices making one epoch
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    frame_limits: tuple | None = None   # the dataset's own (min_num_frame, max_num_frame), None: the config's


def _resolve(path, base_dir):
    """A relative path as upstream reads it, from the launch folder: the working directory when it
    exists there, else the first of ``base_dir`` and the folders above it where it exists (the
    tools' scripts run from a folder above their data files: ``internvl_chat/``, ``finetune/``),
    else ``base_dir`` joined (the error then names that path)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    folder = os.path.abspath(base_dir)
    while True:
        candidate = os.path.join(folder, path)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return os.path.join(base_dir, path)
        folder = parent


def _join_root(root, path):
    if os.path.isabs(path):
        return path
    if root.startswith("s3://"):
        return root + path
    return os.path.join(root, path)


def _rng(seed, name):
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def spec_value(spec, key, default, kind, where):
    """``spec[key]`` as ``kind`` (bool | int | float); absent or null: ``default``; a value of
    another JSON type is a ``DataError`` naming ``where`` and the key (see the module docstring)."""
    v = spec.get(key) if hasattr(spec, "get") else getattr(spec, key, None)
    if v is None:
        return default
    if kind is bool:
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
        raise DataError(f"{where}: {key} must be true or false, got {json.dumps(v)}"
                        + (" (a string: write true / false without quotes)" if isinstance(v, str) else ""))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{where}: {key} must be a number, got {json.dumps(v)}")
    if kind is int and v != int(v):
        raise DataError(f"{where}: {key} must be a whole number, got {v}")
    return kind(v)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")   # bytes that are not UTF-8, as surrogateescape decodes them


def _read_text(path) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped, bytes that are not UTF-8 kept
    as lone surrogates (``_NOT_UTF8``) so the record holding them can be named."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def _utf8_problem(text, start=0, end=None) -> tuple[int, str] | None:
    """(line offset from ``start``'s line, reason) of the first byte in ``text[start:end]`` that is not
    UTF-8, or None."""
    m = _NOT_UTF8.search(text, start, len(text) if end is None else end)
    if m is None:
        return None
    col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
    return text.count("\n", start, m.start()), f"not UTF-8: byte 0x{ord(m.group(0)) - 0xDC00:02x} at column {col}"


# ----------------------------------------------------------------------------------------------- sampling


def repeat_time_indices(n, repeat_time):
    """InternVL ``repeat_time``: r < 1 keeps the first floor(n*r) lines; r >= 1 must be a whole number."""
    r = float(repeat_time)
    if r < 0:
        raise DataError(f"repeat_time must be >= 0, got {repeat_time}")
    if r < 1:
        return np.arange(int(math.floor(n * r)), dtype=np.int64)
    if r != int(r):
        raise DataError(f"repeat_time {repeat_time} > 1 must be a whole number")
    return np.tile(np.arange(n, dtype=np.int64), int(r))


def given_num_indices(n, k, rng):
    """XComposer data.txt: floor(k*1000) samples; fewer records -> all + extra draws with replacement,
    more -> a subset without replacement."""
    num = int(math.floor(float(k) * 1000 + 1e-9))
    if n == 0:
        return np.zeros(0, np.int64)
    if n >= num:
        return np.sort(rng.choice(n, size=num, replace=False)).astype(np.int64)
    return np.concatenate([np.arange(n), np.sort(rng.integers(0, n, size=num - n))]).astype(np.int64)


def sample_ratio_indices(n, ratio, rng):
    """XTuner ``sample_ratio``: floor(r) full repeats + a random subset (without replacement) of the rest."""
    r = float(ratio)
    if r < 0:
        raise DataError(f"sample_ratio must be >= 0, got {ratio}")
    target = int(math.floor(n * r + 1e-9))
    reps = int(math.floor(r))
    base = np.tile(np.arange(n, dtype=np.int64), reps)
    rest = max(0, target - reps * n)
    extra = np.sort(rng.choice(n, size=rest, replace=False)) if rest else np.zeros(0, np.int64)
    return np.concatenate([base, extra]).astype(np.int64)


# ----------------------------------------------------------------------------------------------- parsing


def iter_jsonl(path):
    """Yield (line_no, obj, error) for the non-blank lines of a JSONL file."""
    for k, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        bad = _utf8_problem(line)
        if bad:
            yield k, None, bad[1]
            continue
        try:
            yield k, json.loads(line), None
        except json.JSONDecodeError as e:
            yield k, None, f"malformed JSON: {e.msg} (column {e.colno})"


def iter_json_list(path):
    """Yield (line_no, obj, error) for the elements of a JSON list file; line = where the element starts."""
    text = _read_text(path)
    dec = json.JSONDecoder()
    ws = re.compile(r"[\s,]*")
    pos = ws.match(text, 0).end()
    if pos >= len(text) or text[pos] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"malformed JSON: {e.msg}"
            return
        yield 1, None, f"malformed JSON: expected a list, got {type(obj).__name__}"
        return
    pos += 1
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text):
            yield text.count("\n", 0, pos) + 1, None, "malformed JSON: unterminated list"
            return
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            start = pos
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"malformed JSON: {e.msg}"
            return  # cannot resynchronise inside a broken list
        bad = _utf8_problem(text, start, pos)
        if bad:
            yield line + bad[0], None, bad[1]
        else:
            yield line, obj, None


def _frame_files(folder):
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)]
    key = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
    return [os.path.join(folder, n) for n in sorted(names, key=key)]


def parse_record(obj, *, source, file, line, root, fmt, check_files=True):
    """Raw JSON object -> Record (``error`` set on the first validation failure)."""
    rec = Record(source=source, file=file, line=line)
    try:
        _fill_record(rec, obj, root=root, fmt=fmt, check_files=check_files)
    except _Bad as e:
        rec.error = str(e)
    return rec


class _Bad(Exception):
    pass


XTUNER_IMAGE = "<IMG_CONTEXT>"     # XTuner v1's image placeholder in a message's text
XTUNER_VIDEO = "<VIDEO_CONTEXT>"   # and its video placeholder


def _loss_default(role):
    return role == "assistant"


def _openai_messages(obj):
    """An XTuner v1 record (OpenAI-style ``messages``: ``content`` a string or a list of ``text``,
    ``image_url`` {url, image_wh}, ``video_url`` {url} items) -> the InternVL form this module
    validates: ``conversations`` of strings with ``<image>`` / ``<video>`` placeholders, ``image``
    (the urls in order), ``video``. As XTuner: a list's text items are concatenated, media items
    add no text, each ``<IMG_CONTEXT>`` in the text takes the next image; a message whose images
    have no placeholder anywhere in the record gets one per image before its text."""
    turns, images, videos, placed = [], [], [], 0
    for k, m in enumerate(obj["messages"], 1):
        if not isinstance(m, dict):
            raise _Bad(f"message {k} is not an object")
        role = m.get("role")
        if m.get("thinking") is not None:
            raise _Bad(f"message {k} ({role}) has 'thinking', which mmjax does not train on yet")
        if m.get("loss") is not None and bool(m["loss"]) != _loss_default(str(role)):
            raise _Bad(f"message {k} ({role}) sets loss={m['loss']}; only the default (assistant turns "
                       "supervised, others not) is supported")
        content = m.get("content")
        if isinstance(content, list):
            text, own = "", []
            for j, item in enumerate(content, 1):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    text += item["text"]
                elif kind in ("image_url", "video_url", "image"):
                    ref = item.get(kind)
                    url = ref.get("url") if isinstance(ref, dict) else None
                    if not isinstance(url, str) or not url:
                        raise _Bad(f"message {k} item {j} ({kind}) has no url")
                    wh = ref.get("image_wh")
                    if wh is not None:
                        wh = wh[0] if isinstance(wh, list) and len(wh) == 1 and isinstance(wh[0], list) else wh
                        if not (isinstance(wh, list) and len(wh) == 2 and all(isinstance(x, int) and x > 0 for x in wh)):
                            raise _Bad(f"message {k} item {j}: image_wh must be [width, height], got {ref['image_wh']}")
                    if role != "user":
                        raise _Bad(f"message {k} ({role}) holds a {kind}; media belong in user messages")
                    (videos if kind == "video_url" else own).append(url)
                else:
                    raise _Bad(f"message {k} item {j}: unknown content item {str(item)[:60]}")
            images += own
            placed += text.count(XTUNER_IMAGE)
            turns.append({"from": role, "value": text, "_images": len(own)})
        elif isinstance(content, str):
            placed += content.count(XTUNER_IMAGE)
            turns.append({"from": role, "value": content, "_images": 0})
        else:
            raise _Bad(f"message {k} ({role}) has no content (a string or a list of items)")
    for t in turns:
        n = t.pop("_images")
        if placed == 0 and n:
            t["value"] = "<image>\n" * n + t["value"]
        t["value"] = t["value"].replace(XTUNER_IMAGE, "<image>").replace(XTUNER_VIDEO, "<video>")
    out = {"conversations": turns}
    if images:
        out["image"] = images
    if len(videos) > 1:
        raise _Bad(f"{len(videos)} videos in one record; mmjax takes one")
    if videos:
        out["video"] = videos[0]
    return out


def _fill_record(rec, obj, *, root, fmt, check_files):
    if not isinstance(obj, dict):
        raise _Bad(f"record is a {type(obj).__name__}, not an object")
    if "conversations" not in obj and isinstance(obj.get("messages"), list):
        obj = _openai_messages(obj)
    turns = obj.get("conversations")
    key_from, key_val = "from", "value"
    if turns is None and "messages" in obj:
        turns, key_from, key_val = obj["messages"], "role", "content"
    if not isinstance(turns, list) or not turns:
        raise _Bad("missing or empty 'conversations'")
    msgs = []
    for k, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise _Bad(f"turn {k} is not an object")
        raw_role = t.get(key_from, t.get("role", t.get("from")))
        role = ROLE_MAP.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise _Bad(f"unknown role {raw_role!r} in turn {k}")
        value = t.get(key_val, t.get("value", t.get("content")))
        if not isinstance(value, str):
            raise _Bad(f"turn {k} ({raw_role}) has no text value")
        if fmt == "xcomposer":
            value = value.replace("<ImageHere>", "<image>")
        if not value.strip():
            raise _Bad(f"empty turn {k} ({raw_role})")
        msgs.append([role, value])
    for k, (role, _) in enumerate(msgs):
        if role == "system" and k != 0:
            raise _Bad(f"system turn {k + 1} is not the first turn")
    body_start = 1 if msgs[0][0] == "system" else 0
    while len(msgs) > body_start and msgs[body_start][0] == "assistant":
        del msgs[body_start]  # upstream drops a leading assistant turn
    body = msgs[body_start:]
    if not any(r == "assistant" for r, _ in body):
        raise _Bad("no assistant turn")
    for k, (role, _) in enumerate(body):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise _Bad(f"turns do not alternate user/assistant (turn {k + 1 + body_start} is {role})")
    for role, v in msgs:
        if role != "user" and ("<image>" in v or "<video>" in v):
            raise _Bad(f"image/video placeholder in a {role} turn")
    first_user = body_start

    image, video = obj.get("image"), obj.get("video")
    if image and video:
        raise _Bad("record has both 'image' and 'video'")
    n_placeholders = sum(v.count("<image>") for _, v in msgs)
    if video:
        if n_placeholders:
            raise _Bad(f"{n_placeholders} <image> placeholders in a video record")
        n_video = sum(v.count("<video>") for _, v in msgs)
        if n_video > 1:
            raise _Bad(f"{n_video} <video> placeholders for 1 video")
        if n_video == 0:
            msgs[first_user][1] = "<video>\n" + msgs[first_user][1]
        clip = obj.get("clip")
        if clip is not None:
            if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(t, (int, float)) for t in clip)
                    and 0 <= clip[0] < clip[1]):
                raise _Bad(f"'clip' must be [start, end] seconds with 0 <= start < end, got {json.dumps(clip)}")
            rec.clip = (float(clip[0]), float(clip[1]))
        if isinstance(video, str) and is_video_file(video) and not video.endswith("/"):
            path = _join_root(root, video)
            if check_files and not video.startswith("s3://") and not os.path.isfile(path):
                raise _Bad(f"missing video: {path}")
            rec.video = path
            rec.messages = [tuple(m) for m in msgs]
            return
        if rec.clip is not None:
            raise _Bad("'clip' applies to a video file, not to frames")
        if isinstance(video, str):
            folder = _join_root(root, video)
            if not os.path.isdir(folder):
                if os.path.isfile(folder):
                    raise _Bad(f"{folder} is neither a video file ({', '.join(VIDEO_EXTS)}) nor a frame folder")
                raise _Bad(f"missing video frame folder: {folder}")
            frames = _frame_files(folder)
            if not frames:
                raise _Bad(f"no image frames in video folder: {folder}")
        elif isinstance(video, list) and video and all(isinstance(p, str) for p in video):
            frames = [_join_root(root, p) for p in video]
        else:
            raise _Bad("'video' must be a video file, a frame folder or a non-empty list of frame paths")
        if check_files:
            for p in frames:
                if not os.path.isfile(p):
                    raise _Bad(f"missing image: {p}")
        rec.video = frames
    elif image:
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise _Bad("'image' must be a path or a list of paths")
        if fmt == "xcomposer":   # relative to the launch folder (see _resolve), not a media root
            paths = [_resolve(p, root) for p in paths]
        else:
            paths = [_join_root(root, p) for p in paths]
        if len(paths) == 1 and n_placeholders == 0:
            msgs[first_user][1] = "<image>\n" + msgs[first_user][1]
            n_placeholders = 1
            rec.image_prepended = True
        if n_placeholders != len(paths):
            raise _Bad(f"{n_placeholders} <image> placeholders for {len(paths)} images")
        if check_files:
            for p in paths:
                if not p.startswith("s3://") and not os.path.isfile(p):
                    raise _Bad(f"missing image: {p}")
        rec.images = paths
    else:
        n_video = sum(v.count("<video>") for _, v in msgs)
        if n_placeholders or n_video:
            raise _Bad(f"{n_placeholders + n_video} image/video placeholders for 0 images")
    rec.messages = [tuple(m) for m in msgs]


def _read_records(path, *, source, root, fmt, check_files, json_list=False):
    it = iter_json_list(path) if json_list else iter_jsonl(path)
    out = []
    for line, obj, err in it:
        if err is not None:
            out.append(Record(source=source, file=path, line=line, error=err))
        else:
            out.append(parse_record(obj, source=source, file=path, line=line, root=root, fmt=fmt,
                                    check_files=check_files))
    return out


# ----------------------------------------------------------------------------------------------- sources


def load_meta_json(meta_path, *, check_files=True):
    """InternVL ``--meta_path`` file -> list of Sources (in file order)."""
    text = _read_text(meta_path)
    bad = _utf8_problem(text)
    if bad:
        raise DataError(f"{meta_path}:{bad[0] + 1}: {bad[1]}")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path}:{e.lineno}: malformed meta JSON: {e.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: meta JSON must be an object {{name: {{root, annotation, ...}}}}")
    base = os.path.dirname(os.path.abspath(meta_path))
    sources = []
    for name, spec in meta.items():
        where = f"{meta_path}:{_key_line(text, name)}: dataset {name!r}"
        for key in ("root", "annotation"):
            if not isinstance(spec, dict) or key not in spec:
                raise DataError(f"{meta_path}: dataset {name!r} lacks {key!r}")
        ann = _resolve(spec["annotation"], base)
        if not str(ann).endswith("jsonl"):
            raise DataError(f"{meta_path}: dataset {name!r}: annotation must be a .jsonl file: {ann}")
        if not os.path.isfile(ann):
            raise DataError(f"{meta_path}: dataset {name!r}: annotation file not found: {ann}")
        root = spec["root"] if str(spec["root"]).startswith("s3://") else _resolve(spec["root"], base)
        records = _read_records(ann, source=name, root=root, fmt="internvl", check_files=check_files)
        try:
            order = repeat_time_indices(len(records), spec_value(spec, "repeat_time", 1.0, float, where))
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        length = spec_value(spec, "length", None, int, where)
        if length is not None and length != len(records):   # upstream only logs it; a stale meta is worth a word
            logging.warning("%s: length %d, but %s holds %d records (mmjax reads the file)", where, length, ann,
                            len(records))
        mdp = spec_value(spec, "max_dynamic_patch", None, int, where)
        if mdp is not None and mdp < 1:
            raise DataError(f"{where}: max_dynamic_patch must be >= 1, got {mdp}")
        limits = (spec_value(spec, "min_num_frame", None, int, where), spec_value(spec, "max_num_frame", None, int, where))
        sources.append(Source(name, "internvl", ann, records, order, spec_value(spec, "data_augment", False, bool, where),
                              mdp, None if limits == (None, None) else limits))
    return sources


def _key_line(text, key) -> int:
    """The line of a top-level key in a JSON object's text (1 when it cannot be found)."""
    at = text.find(json.dumps(key) + ":")
    if at < 0:
        at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def load_xcomposer(data_txt, *, seed=0, check_files=True):
    """XComposer2 ``data.txt`` (``<json path> <k>`` lines) or a single JSON list file -> Sources."""
    base = os.path.dirname(os.path.abspath(data_txt))
    entries = []
    if data_txt.endswith(".json"):
        entries.append((data_txt, None, 1))
    else:
        text = _read_text(data_txt)
        for k, line in enumerate(text.split("\n"), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            bad = _utf8_problem(line)
            if bad:
                raise DataError(f"{data_txt}:{k}: {bad[1]}")
            parts = line.rsplit(None, 1)
            num = None
            if len(parts) == 2:
                try:
                    num = float(parts[1])
                    path = parts[0]
                except ValueError:
                    path = line
                if num is not None and not num >= 0:   # NaN too
                    raise DataError(f"{data_txt}:{k}: sample count {parts[1]} must be >= 0 "
                                    f"(thousands of samples drawn from {parts[0]})")
            else:
                path = line
            entries.append((_resolve(path, base), num, k))
    sources = []
    names = set()
    for path, num, k in entries:
        if not os.path.isfile(path):
            raise DataError(f"{data_txt}:{k}: JSON file not found: {path}")
        name = os.path.splitext(os.path.basename(path))[0]
        while name in names:
            name += "_"
        names.add(name)
        records = _read_records(path, source=name, root=os.path.dirname(os.path.abspath(path)),
                                fmt="xcomposer", check_files=check_files, json_list=True)
        order = (np.arange(len(records), dtype=np.int64) if num is None
                 else given_num_indices(len(records), num, _rng(seed, name)))
        sources.append(Source(name, "xcomposer", path, records, order))
    return sources


def _get(entry, key, default=None):
    if hasattr(entry, "get"):
        v = entry.get(key, default)
    else:
        v = getattr(entry, key, default)
    return default if v is None else v


def load_xtuner(datasets, *, seed=0, check_files=True):
    """XTuner-style list of dicts: anno_path (.jsonl or folder searched recursively), media_root,
    sample_ratio, name (+ optional data_augment, max_dynamic_patch)."""
    sources = []
    for k, entry in enumerate(datasets):
        anno = _get(entry, "anno_path")
        if not anno:
            raise DataError(f"data.datasets[{k}]: missing 'anno_path'")
        if os.path.isdir(anno):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(anno) for f in fs if f.endswith(".jsonl"))
            if not files:
                raise DataError(f"data.datasets[{k}]: no .jsonl files under {anno}")
        elif os.path.isfile(anno):
            files = [anno]
        else:
            raise DataError(f"data.datasets[{k}]: anno_path not found: {anno}")
        base_name = _get(entry, "name") or os.path.splitext(os.path.basename(os.path.normpath(anno)))[0]
        media_root = _get(entry, "media_root", "")
        where = f"data.datasets[{k}]"
        ratio = spec_value(entry, "sample_ratio", 1.0, float, where)
        mdp = spec_value(entry, "max_dynamic_patch", None, int, where)
        augment = spec_value(entry, "data_augment", False, bool, where)
        for path in files:
            name = base_name if len(files) == 1 else f"{base_name}/{os.path.relpath(path, anno)}"
            records = _read_records(path, source=name, root=media_root, fmt="xtuner", check_files=check_files)
            order = sample_ratio_indices(len(records), ratio, _rng(seed, name))
            sources.append(Source(name, "xtuner", path, records, order, augment, mdp))
    return sources


def load_sources(cfg):
    """All sources named by a ``config.data`` (meta_path, data_txt, datasets), in that order."""
    check_files = bool(cfg.get("check_files", True))
    seed = int(cfg.get("seed", 0))
    sources = []
    if cfg.get("meta_path"):
        sources += load_meta_json(cfg.meta_path, check_files=check_files)
    if cfg.get("data_txt"):
        sources += load_xcomposer(cfg.data_txt, seed=seed, check_files=check_files)
    from mmjax.data.config import xtuner_datasets
    datasets = xtuner_datasets(cfg)
    if datasets:
        sources += load_xtuner(datasets, seed=seed, check_files=check_files)
    seen = set()
    for s in sources:
        if s.name in seen:
            raise DataError(f"duplicate source name {s.name!r}; give each dataset a unique name")
        seen.add(s.name)
    return sources
