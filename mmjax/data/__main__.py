"""Data CLI.

    python -m mmjax.data check --config=configs/<name>.py [--config.data.max_length=4096]
        Builds every record of every source (images decoded, tokenized, truncated) and prints per-source
        counts (samples per epoch, images, tiles, tokens, supervised tokens) and every bad record as
        ``file:line: reason``. Exit status 1 if any record is bad.

    python -m mmjax.data show --config=configs/<name>.py --index=N
        Sample N of the epoch index: the rendered conversation with supervised spans in ⟦...⟧ (green
        on a terminal), image blocks collapsed, the tile grid of every image and the token counts.

The tokenizer comes from ``config.tokenizer_path`` if set, else ``config.model_path``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mmjax.errors import config_or_exit, expected_message, one_line, parse_flags_or_exit

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config() with a `data` field).")
_INDEX = flags.DEFINE_integer("index", 0, "Sample index for `show`.")
_COLOR = flags.DEFINE_enum("color", "auto", ["auto", "always", "never"], "Colour supervised spans in `show`.")
_WORKDIR = flags.DEFINE_string("workdir", None, "For configs that generate their data (configs/tiny.py): the run "
                               "directory holding it (default: workdirs/<config name>, as mmjax.train).")

USAGE = "usage: python -m mmjax.data check|show --config=configs/<name>.py [--index=N]"


class CliError(Exception):
    pass


def _tokenizer_for(config):
    from mmjax.data.tokenizer import load_tokenizer
    path = config.get("tokenizer_path") or config.get("model_path")
    if not path:
        raise CliError("config has neither tokenizer_path nor model_path: set --config.tokenizer_path=DIR")
    if not os.path.isdir(path):
        key = "tokenizer_path" if config.get("tokenizer_path") else "model_path"
        raise CliError(f"config.{key}: tokenizer directory not found: {path}")
    if path not in _TOKENIZERS:  # loading a 150k-entry tokenizer takes seconds; reuse within a process
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


_TOKENIZERS = {}


def _resolve_template(config) -> str:
    """An empty data.template means the checkpoint's own, as in training."""
    from mmjax.data.templates import resolve_template
    from mmjax.weights.loader import read_config
    path = config.get("model_path")
    if not path or not os.path.isdir(path):
        raise CliError("data.template is empty (the checkpoint's own) but config.model_path names no checkpoint "
                       "directory: set --config.data.template")
    return resolve_template(config.data, read_config(path)[0], where=os.path.join(path, "config.json"))


def _fmt_table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if k else str(v).ljust(w) for k, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_check(config, out=sys.stdout):
    from mmjax.data.samples import run_check
    tok = _tokenizer_for(config)
    stats, bad, warnings = run_check(config.data, tok)
    header = ["source", "records", "samples/epoch", "bad", "images", "tiles", "tokens", "supervised", "truncated"]
    rows = [[s.name, s.records, s.samples, s.bad, s.images, s.tiles, s.tokens, s.supervised, s.truncated]
            for s in stats]
    tot = ["TOTAL"] + [sum(r[k] for r in rows) for k in range(1, len(header))]
    print(_fmt_table(rows + [tot], header), file=out)
    for w in warnings:
        print(f"warning: {w}", file=out)
    if bad:
        print(f"\n{len(bad)} bad record(s):", file=out)
        for where, reason in bad:
            print(f"{where}: {reason}", file=out)
        return 1
    print("\nall records OK", file=out)
    return 0


def _collapse_images(text):
    import re
    return re.sub(r"<img>((?:<IMG_CONTEXT>)+)</img>",
                  lambda m: f"<img><IMG_CONTEXT>x{m.group(1).count('<IMG_CONTEXT>')}</img>", text)


SUPERVISED = ("\u27e6", "\u27e7")   # the marks around supervised spans: not brackets data uses (boxes: [[x, y, ...]])


def render_supervised(tokenizer, input_ids, labels, color=False, image_token=None):
    """Decode with supervised spans wrapped in SUPERVISED marks (and green). ``image_token``
    (XComposer2 samples): the positions the model fills with image features, shown as one
    ``<image: N positions>`` per run instead of the placeholder id's text."""
    from mmjax.data.batch import IGNORE_INDEX
    image = [False] * len(input_ids) if image_token is None else [int(k) >= 0 for k in image_token]
    parts, cur, cur_key = [], [], None
    for t, l, im in zip(input_ids.tolist(), labels.tolist(), image):
        key = (l != IGNORE_INDEX, im)
        if cur and key != cur_key:
            parts.append((cur_key, cur))
            cur = []
        cur.append(t)
        cur_key = key
    if cur:
        parts.append((cur_key, cur))
    out = []
    for (sup, im), ids in parts:
        text = (f"<image: {len(ids)} positions>" if im else
                _collapse_images(tokenizer.decode(ids, skip_special_tokens=False)))
        if sup:
            text = f"{SUPERVISED[0]}{text}{SUPERVISED[1]}"
            text = f"\x1b[32m{text}\x1b[0m" if color else text
        out.append(text)
    return "".join(out)


def cmd_show(config, index, out=sys.stdout, color=False):
    from mmjax.data.samples import SampleError, SampleSource
    tok = _tokenizer_for(config)
    src = SampleSource(config.data, tok, mode="show")
    if not 0 <= index < len(src):
        raise CliError(f"--index={index} out of range: the epoch index has {len(src)} samples "
                       f"({src.skip_summary()})")
    s, rec = src.record(index)
    print(f"sample {index}: source {s.name!r} ({s.fmt}), {rec.where}, kind {rec.kind}", file=out)
    try:
        sample, info = src.builder.build(rec, index=index, source_id=int(src._src[index]),
                                         max_dynamic_patch=s.max_dynamic_patch, with_info=True,
                                         verify_tokenization=True)
    except SampleError as e:
        print(f"{rec.where}: {e}", file=out)
        return 1
    for k, (p, (w, h), (c, r), n) in enumerate(zip(info.image_paths, info.image_sizes, info.grids,
                                                   info.tiles_per_image)):
        thumb = " + thumbnail" if n > c * r else ""
        print(f"image {k + 1}: {p} {w}x{h} -> grid {c}x{r}{thumb} = {n} tiles", file=out)
    print(f"tokens {sample['num_tokens']}, supervised {sample['num_supervised']}, tiles {sample['num_tiles']}"
          f"{', TRUNCATED' if info.truncated else ''}"
          f"{'' if info.matches_whole in (None, True) else ', segment tokenization differs from whole-string'}",
          file=out)
    print("-" * 80, file=out)
    print(render_supervised(tok, sample["input_ids"], sample["labels"], color=color,
                            image_token=sample.get("image_token")), file=out)
    return 0


def main(argv):
    if len(argv) != 2 or argv[1] not in ("check", "show"):
        print(USAGE, file=sys.stderr)
        return 2
    config = config_or_exit(_CONFIG) if flags.FLAGS["config"].present else None
    if config is None:
        print("error: --config is required\n" + USAGE, file=sys.stderr)
        return 2
    if "data" not in config:
        print("error: the config has no `data` field", file=sys.stderr)
        return 2
    try:
        if config.get("synthetic") is not None and config.synthetic.get("enabled"):
            # the embedded default generates what the config does not name, where training does
            from mmjax.data.embedded import prepare_embedded
            for note in prepare_embedded(config, _WORKDIR.value or os.path.join("workdirs", config.name)):
                print(note)
        if not config.data.template:
            print(_resolve_template(config))
        if argv[1] == "check":
            return cmd_check(config)
        color = _COLOR.value == "always" or (_COLOR.value == "auto" and sys.stdout.isatty())
        return cmd_show(config, _INDEX.value, color=color)
    except Exception as e:   # noqa: BLE001 - expected failures are one line, bugs keep their traceback
        msg = str(e) if isinstance(e, CliError) else expected_message(e)
        if msg is None:
            raise
        print(f"error: {one_line(msg)}", file=sys.stderr)
        return 2


def run():
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
    run()
