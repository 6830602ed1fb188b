"""Default ``config.data`` and its validation (one-line errors naming the key or file)."""

from __future__ import annotations

import os

import ml_collections

from mmjax.data.images import NORMALIZE
from mmjax.data.templates import TEMPLATES
from mmjax.data.xcomposer import TEMPLATE as XCOMPOSER_TEMPLATE


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
    c.num_video_frames = 8        # frames sampled evenly from a video frame list / folder, one tile each
    c.dummy_image_for_text = False  # text-only samples carry one white tile with image_flags 0
    c.data_augment = False        # JPEG-quality augmentation for sources that do not say (xcomposer / xtuner)
    # policy
    c.seed = 42
    c.max_skip_fraction = 0.01    # training stops when more than this fraction of samples is skipped
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
                raise ValueError(f"{where}: neither a JSON list nor a file: {raw[:80]}")
            where = raw
            with open(raw, encoding="utf-8") as f:
                raw = f.read()
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(extra, list) or not all(isinstance(d, dict) for d in extra):
            raise ValueError(f"{where}: must be a JSON list of dataset objects")
        out += extra
    return out


def validate_data_config(c):
    """Raise ValueError with a one-line message naming the offending key or file."""
    names = sorted(TEMPLATES) + [XCOMPOSER_TEMPLATE]
    if c.template not in names:
        raise ValueError(f"data.template: unknown template {c.template!r}; choose from {names}")
    if c.get("hd_variant", "4khd") not in ("4khd", "2.5"):
        raise ValueError(f"data.hd_variant: must be '4khd' or '2.5', got {c.hd_variant!r}")
    if int(c.get("hd_num", -1)) == 0 or int(c.get("hd_num", -1)) < -1:
        raise ValueError(f"data.hd_num: -1 (plain resize) or >= 1 (HD crops), got {c.hd_num}")
    if c.normalize_type not in NORMALIZE:
        raise ValueError(f"data.normalize_type: unknown {c.normalize_type!r}; choose from {sorted(NORMALIZE)}")
    if c.get("alpha", "white") not in ("white", "drop"):
        raise ValueError(f"data.alpha: must be 'white' or 'drop', got {c.alpha!r}")
    for key in ("image_size", "min_dynamic_patch", "max_dynamic_patch", "num_image_token", "max_length",
                "num_video_frames"):
        if int(c.get(key)) < 1:
            raise ValueError(f"data.{key}: must be >= 1, got {c.get(key)}")
    if c.min_dynamic_patch > c.max_dynamic_patch:
        raise ValueError(f"data.min_dynamic_patch ({c.min_dynamic_patch}) > data.max_dynamic_patch "
                         f"({c.max_dynamic_patch})")
    if not 0.0 <= float(c.max_skip_fraction) <= 1.0:
        raise ValueError(f"data.max_skip_fraction: must be in [0, 1], got {c.max_skip_fraction}")
    datasets = xtuner_datasets(c)
    if not (c.get("meta_path") or c.get("data_txt") or datasets):
        raise ValueError("data: no source configured; set data.meta_path, data.data_txt, data.datasets or "
                         "data.datasets_json")
    if c.get("meta_path") and not os.path.isfile(c.meta_path):
        raise ValueError(f"data.meta_path: file not found: {c.meta_path}")
    if c.get("data_txt") and not os.path.isfile(c.data_txt):
        raise ValueError(f"data.data_txt: file not found: {c.data_txt}")
    for k, entry in enumerate(datasets):
        anno = entry.get("anno_path") if hasattr(entry, "get") else None
        if not anno:
            raise ValueError(f"data.datasets[{k}].anno_path: missing")
        if not os.path.exists(anno):
            raise ValueError(f"data.datasets[{k}].anno_path: not found: {anno}")
        ratio = entry.get("sample_ratio", 1.0)
        if ratio is not None and float(ratio) < 0:
            raise ValueError(f"data.datasets[{k}].sample_ratio: must be >= 0, got {ratio}")
    return c
