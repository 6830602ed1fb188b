"""Default ``config.data`` and its validation (one-line errors naming the key or file)."""

from __future__ import annotations

import os

import ml_collections

from mmjax.data.images import NORMALIZE
from mmjax.data.templates import TEMPLATES
from mmjax.data.xcomposer import TEMPLATE as XCOMPOSER_TEMPLATE
from mmjax.errors import DataError


ON_OVERSIZE = ("error", "skip")


def known_templates() -> list[str]:
    """Every ``data.template`` name: the InternVL-family chat templates and XComposer2's."""
    return sorted(TEMPLATES) + [XCOMPOSER_TEMPLATE]


def row_budget(c) -> tuple[int, int]:
    """(tokens, tiles) one row of the loader holds: what every sample must fit."""
    tokens = int(c.max_length) if c.get("packing", "first_fit") == "none" else int(c.pack_max_length)
    return tokens, int(c.max_tiles_per_pack)


def default_data_config():
    c = ml_collections.ConfigDict()
    # sources (any combination; paths may be '' when unused)
    c.meta_path = ""              # InternVL meta JSON {name: {root, annotation, data_augment, max_dynamic_patch, repeat_time}}
    c.data_txt = ""               # XComposer2 data.txt ('<json path> <k>' lines) or one XComposer JSON list
    c.datasets = []               # XTuner-style: [dict(anno_path=, media_root=, sample_ratio=1.0, name=)]
    c.datasets_json = ""          # the same list as JSON text or a .json file (a list cannot be a flag)
    c.check_files = True          # stat every image path while reading records (cheap, up front)
    # conversation
    c.template = "internvl2_5"     # internlm2-chat | phi3-chat | internvl2_5 | qwen3 | intern-s1 | internvl-3.5 | ixc2
    c.system_message = ""         # overrides the template's default system prompt when set
    c.max_length = 8192           # per-sample token limit (truncation never cuts an image block)
    # images
    c.image_size = 448
    c.dynamic_image_size = True
    c.min_dynamic_patch = 1
    c.max_dynamic_patch = 12
    c.use_thumbnail = True
    c.num_image_token = 256       # tokens per tile after pixel shuffle
    # InternLM-XComposer2 (template 'ixc2'): -1 = each image one image_size square (IXC2 / IXC2-VL);
    # > 0 = the HD grid of at most hd_num image_size crops + a global view (IXC2-4KHD '4khd', IXC2.5 '2.5')
    c.hd_num = -1
    c.hd_variant = "4khd"
    c.normalize_type = "imagenet"  # imagenet | clip | siglip
    c.alpha = "white"             # transparency: 'white' (composite on white) | 'drop' (upstream convert('RGB'))
    # video (a file, a frame folder or a frame list; one tile a frame; mmjax/data/video.py): a fixed
    # num_video_frames, the middle of as many equal segments; with max_num_frame > 0, training draws
    # a count in [min_num_frame, max_num_frame] and a frame in each segment (upstream InternVL: 8-32),
    # check / show keep the fixed count. A meta entry may set min_num_frame / max_num_frame
    c.num_video_frames = 8
    c.min_num_frame = 8
    c.max_num_frame = 0
    c.dummy_image_for_text = False  # text-only samples carry one white tile with image_flags 0
    c.data_augment = False        # JPEG-quality augmentation for sources that do not say (xcomposer / xtuner)
    # policy
    c.seed = 42
    c.max_skip_fraction = 0.01    # training stops when more than this fraction of samples is skipped
    # a sample that cannot fit one row (pack_max_length tokens, max_tiles_per_pack tiles; max_length
    # unpacked): 'error' stops with its file:line (before step 1 where the record alone shows it),
    # 'skip' drops it and counts it with the other skips
    c.on_oversize = "error"
    # consumed by mmjax/data/pipeline.py (packing / loader)
    c.pack_max_length = 8192
    c.max_tiles_per_pack = 48
    c.loss_reduction = "token"    # token | sample | square (len2weight)
    c.shuffle = True
    c.num_workers = 0             # grain worker processes decoding images (0 = in the main process)
    # several processes: 'samples' (each decodes 1/P of the data) | 'rows' (each runs the global
    # pipeline and keeps its rows: the global batches, and the checkpointed loader state, do not
    # depend on the process count, so a run can resume on another number of processes)
    c.shard_mode = "samples"
    c.batch_size = 16             # packed rows per optimizer step, global over all processes
    c.packing = "first_fit"       # first_fit | best_fit | none (one padded sample per row)
    return c


def xtuner_datasets(c) -> list:
    """``data.datasets`` followed by the entries of ``data.datasets_json`` (JSON text, or the path
    of a JSON file, holding a list of XTuner dataset dicts); ValueError naming the key."""
    import json
    out = list(c.get("datasets") or [])
    raw = c.get("datasets_json") or ""
    if raw:
        where = "data.datasets_json"
        if not raw.lstrip().startswith("["):
            if not os.path.isfile(raw):
                raise DataError(f"{where}: neither a JSON list nor a file: {raw[:80]}")
            where = raw
            with open(raw, encoding="utf-8") as f:
                raw = f.read()
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(extra, list) or not all(isinstance(d, dict) for d in extra):
            raise DataError(f"{where}: must be a JSON list of dataset objects")
        out += extra
    return out


def validate_data_config(c):
    """Raise ValueError with a one-line message naming the offending key or file."""
    names = known_templates()
    if c.template not in names:
        raise DataError(f"data.template: unknown template {c.template!r}; choose from {names}")
    if c.get("hd_variant", "4khd") not in ("4khd", "2.5"):
        raise DataError(f"data.hd_variant: must be '4khd' or '2.5', got {c.hd_variant!r}")
    if int(c.get("hd_num", -1)) == 0 or int(c.get("hd_num", -1)) < -1:
        raise DataError(f"data.hd_num: -1 (plain resize) or >= 1 (HD crops), got {c.hd_num}")
    if c.normalize_type not in NORMALIZE:
        raise DataError(f"data.normalize_type: unknown {c.normalize_type!r}; choose from {sorted(NORMALIZE)}")
    if c.get("alpha", "white") not in ("white", "drop"):
        raise DataError(f"data.alpha: must be 'white' or 'drop', got {c.alpha!r}")
    for key in ("image_size", "min_dynamic_patch", "max_dynamic_patch", "num_image_token", "max_length",
                "num_video_frames"):
        if int(c.get(key)) < 1:
            raise DataError(f"data.{key}: must be >= 1, got {c.get(key)}")
    if int(c.get("max_num_frame", 0)) < 0 or (int(c.get("max_num_frame", 0)) > 0 and
                                               not 1 <= int(c.get("min_num_frame", 8)) <= int(c.max_num_frame)):
        raise DataError(f"data.min_num_frame={c.get('min_num_frame')} / data.max_num_frame={c.get('max_num_frame')}: "
                        "need 1 <= min_num_frame <= max_num_frame (or max_num_frame = 0: a fixed num_video_frames)")
    if c.min_dynamic_patch > c.max_dynamic_patch:
        raise DataError(f"data.min_dynamic_patch ({c.min_dynamic_patch}) > data.max_dynamic_patch "
                         f"({c.max_dynamic_patch})")
    if c.get("on_oversize", "error") not in ON_OVERSIZE:
        raise DataError(f"data.on_oversize: must be one of {ON_OVERSIZE}, got {c.on_oversize!r}")
    if (c.get("packing", "first_fit") != "none" and c.get("on_oversize", "error") == "error"
            and int(c.max_length) > int(c.pack_max_length)):
        raise DataError(f"data.max_length={c.max_length} > data.pack_max_length={c.pack_max_length}: a sample cut "
                        "at max_length may not fit a packed row; lower max_length, raise pack_max_length, or set "
                        "data.on_oversize='skip' to skip the samples that do not fit (counted)")
    if not 0.0 <= float(c.max_skip_fraction) <= 1.0:
        raise DataError(f"data.max_skip_fraction: must be in [0, 1], got {c.max_skip_fraction}")
    datasets = xtuner_datasets(c)
    if not (c.get("meta_path") or c.get("data_txt") or datasets):
        raise DataError("data: no source configured; set data.meta_path, data.data_txt, data.datasets or "
                         "data.datasets_json")
    if c.get("meta_path") and not os.path.isfile(c.meta_path):
        raise DataError(f"data.meta_path: file not found: {c.meta_path}")
    if c.get("data_txt") and not os.path.isfile(c.data_txt):
        raise DataError(f"data.data_txt: file not found: {c.data_txt}")
    for k, entry in enumerate(datasets):
        anno = entry.get("anno_path") if hasattr(entry, "get") else None
        if not anno:
            raise DataError(f"data.datasets[{k}].anno_path: missing")
        if not os.path.exists(anno):
            raise DataError(f"data.datasets[{k}].anno_path: not found: {anno}")
        from mmjax.data.sources import spec_value
        ratio = spec_value(entry, "sample_ratio", 1.0, float, f"data.datasets[{k}]")
        if ratio < 0:
            raise DataError(f"data.datasets[{k}].sample_ratio: must be >= 0, got {ratio}")
    return c
