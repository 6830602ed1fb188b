"""Bad input gets one line: flags, checkpoints, data files, resumes of another run, a second run in
the same workdir. Each case asserts the message (what and where) and that nothing was lost."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmjax.data import default_data_config, run_check
from mmjax.data import sources as src_lib
from mmjax.data.samples import SampleSource
from mmjax.data.tokenizer import build_qwen_test_tokenizer
from mmjax.errors import DataError, UserError, expected_message
from mmjax.train import run as run_lib
from mmjax.train.lock import WorkdirLock
from mmjax.train.setup import ConfigError, Run
from mmjax.weights import CheckpointError
from tests.test_data_sources import conv, make_images, write_jsonl, write_meta
from tests.test_train import REPO, assets, new_workdir, read_losses, tiny_config  # noqa: F401 (fixture)

# ---------------------------------------------------------------------------------- the one place


def test_expected_failures_map_to_one_line_and_bugs_do_not():
    assert expected_message(UserError("bad thing\n  in file x")) == "bad thing in file x"
    try:   # a library wrapping a full disk several levels down
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/5/state/d/0")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as e:
        assert expected_message(e) == "/ckpt/5/state/d/0: no space left on device"
    assert expected_message(ValueError("tensorstore: ... No space left on device ...")).startswith("disk full")
    assert expected_message(OSError(errno.EROFS, "Read-only file system", "/w")) == "/w: read-only file system"
    assert expected_message(KeyError("a bug")) is None
    assert expected_message(TypeError("another bug")) is None


def _train_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mmjax.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/tiny.py", "--config.optim.lrr=1"], "error: --config.optim.lrr: the config has no key 'lrr'; "
                                                            "did you mean 'lr'?"),
    (["--config=configs/tiny.py", "--config.optimm.lr=1"], "error: --config.optimm.lr: the config has no key "
                                                            "'optimm'; did you mean 'optim'?"),
    (["--config=configs/tiny.py", "--config.optim.lr=abc"], "error: flag --config.optim.lr=abc: could not convert"),
    (["--config=configs/tinyy.py"], "error: --config: config file not found: configs/tinyy.py"),
    (["--config=configs/tiny.py", "--config.export.dtype=int8"], "error: config.export.dtype: export dtype must be a "
                                                                  "floating dtype"),
    (["--config=configs/tiny.py", "--config.total_steps=-5"], "error: config.total_steps=-5: must be > 0"),
    (["--config=configs/tiny.py", "--config.data.meta_path=missing.json", "--config.synthetic.num_train=8"],
     "error: data.meta_path: file not found: missing.json"),
])
def test_bad_flags_are_one_line_with_status_2(args, message, tmp_path):
    r = _train_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    assert not (tmp_path / "w" / "checkpoints").exists()


# ---------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(assets, tmp_path) -> Path:
    """A copy of the embedded default's initial checkpoint (InternVL-Chat layout)."""
    out = tmp_path / "ckpt"
    shutil.copytree(assets / "assets" / "init", out)
    return out


def _load(path):
    import mmjax
    return mmjax.from_pretrained(str(path), dtype="float32")


def _set_header_dtype(path: Path, key: str, dtype: str) -> None:
    """Rewrite one tensor's declared dtype in a safetensors header (same length, bytes untouched)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].decode()
    at = header.index(json.dumps(key))
    old = header.index('"dtype":', at)
    start = header.index('"', old + len('"dtype":'))
    end = header.index('"', start + 1)
    assert len(header[start + 1:end]) == len(dtype)
    raw[8:8 + n] = (header[:start + 1] + dtype + header[end:]).encode()
    path.write_bytes(bytes(raw))


def test_a_weight_with_nan_is_named(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    key = "language_model.model.layers.1.feed_forward.w2.weight"
    assert key in tensors
    tensors[key] = tensors[key].copy()
    tensors[key][3, 5] = np.inf
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"tensor {key} holds 1 NaN / Inf values"):
        _load(checkpoint)


def test_float_bytes_declared_integer_are_refused_from_the_header(checkpoint):
    key = "language_model.model.layers.0.attention.wo.weight"
    _set_header_dtype(checkpoint / "model.safetensors", key, "I32")
    with pytest.raises(CheckpointError, match=rf"tensor {key} in model.safetensors: stored as I32, but a weight is a float"):
        _load(checkpoint)


def test_a_config_that_cannot_describe_the_model_names_config_json(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["llm_config"]["num_key_value_heads"] = 3
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ckpt/config.json: num_heads 4 not a multiple of num_kv_heads 3"):
        _load(checkpoint)
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config.json in"):
        _load(checkpoint)


def _real_checkpoint_config(assets, model_path, **extra):
    """The embedded default's run, but on a checkpoint directory (the real-checkpoint code path)."""
    return tiny_config(**{"synthetic.enabled": False, "model_path": str(model_path),
                          "data.meta_path": str(assets / "assets" / "data" / "meta.json"), "export.hf": False,
                          **extra})


def test_an_embedding_smaller_than_the_tokenizer_is_refused_at_start_up(assets, checkpoint, tmp_path):
    from mmjax.train.setup import build_run
    cfg = json.loads((checkpoint / "config.json").read_text())
    rows = cfg["llm_config"]["vocab_size"] - 8
    tensors = load_file(checkpoint / "model.safetensors")
    for key in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
        tensors[key] = tensors[key][:rows].copy()
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    cfg["llm_config"]["vocab_size"] = rows
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"the embedding has {rows} rows, but the tokenizer .* has {rows + 8} base ids"):
        build_run(_real_checkpoint_config(assets, checkpoint), workdir=str(tmp_path / "w"))


def test_a_batch_id_past_the_embedding_is_an_error_naming_it():
    run = SimpleNamespace(vocab_size=100, tokenizer=None, cfg=SimpleNamespace(model_path="m"))
    Run.check_token_ids(run, {"input_ids": np.array([[1, 99]], np.int32)})
    with pytest.raises(ConfigError, match=r"a batch holds token id 104 .* has 100 rows"):
        Run.check_token_ids(run, {"input_ids": np.array([[1, 104]], np.int32)})


# ---------------------------------------------------------------------------------- data files


def test_meta_settings_of_the_wrong_json_type_are_named(tmp_path):
    make_images(tmp_path / "img", ["a.png"])
    recs = [{"image": "a.png", "conversations": conv()}] * 3
    for extra, message in [({"data_augment": "false"}, "data_augment must be true or false, got \"false\""),
                           ({"max_dynamic_patch": "6"}, "max_dynamic_patch must be a number, got \"6\""),
                           ({"repeat_time": "2"}, "repeat_time must be a number")]:
        meta = write_meta(tmp_path, {"ds": (recs, extra)})
        with pytest.raises(DataError, match=rf"meta.json:1: dataset 'ds': {message}"):
            src_lib.load_meta_json(meta)
    meta = write_meta(tmp_path, {"ds": (recs, {"repeat_time": None, "data_augment": None, "max_dynamic_patch": None})})
    (s,) = src_lib.load_meta_json(meta)   # null: the setting's default
    assert len(s.order) == 3 and s.data_augment is False and s.max_dynamic_patch is None


def test_a_stale_meta_length_is_said(tmp_path, caplog):
    make_images(tmp_path / "img", ["a.png"])
    meta = write_meta(tmp_path, {"ds": ([{"image": "a.png", "conversations": conv()}] * 3, {"length": 5})})
    with caplog.at_level(logging.WARNING):
        src_lib.load_meta_json(meta)
    assert "dataset 'ds': length 5, but" in caplog.text and "holds 3 records" in caplog.text


def test_a_bom_is_skipped_and_a_non_utf8_line_is_one_bad_record(tmp_path):
    make_images(tmp_path / "img", ["a.png"])
    good = json.dumps({"image": "a.png", "conversations": conv()}).encode()
    bad = json.dumps({"image": "a.png", "conversations": conv(a="caf\u00e9")}).encode().replace(b"\\u00e9", b"\xe9")
    ann = tmp_path / "ds.jsonl"
    ann.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + bad + b"\n" + good + b"\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"ds": {"root": str(tmp_path / "img"), "annotation": str(ann)}}))
    (s,) = src_lib.load_meta_json(str(meta))
    column = bad.index(b"\xe9") + 1
    assert [r.error for r in s.records] == [None, f"not UTF-8: byte 0xe9 at column {column}", None]
    assert s.records[1].where == f"{ann}:2"


def test_xcomposer_files_name_the_line(tmp_path):
    make_images(tmp_path, ["a.png"])
    rec = {"id": "0", "image": ["a.png"], "conversations": conv("<ImageHere>What?")}
    text = json.dumps([rec, rec], indent=1)
    at = text.index("What?", text.index("What?") + 1)
    data = text[:at].encode() + b"Wh\xffat?" + text[at + 5:].encode()
    (tmp_path / "d.json").write_bytes(data)
    records = src_lib._read_records(str(tmp_path / "d.json"), source="d", root=str(tmp_path), fmt="xcomposer",
                                    check_files=True, json_list=True)
    assert records[0].error is None and records[1].error.startswith("not UTF-8: byte 0xff")
    assert records[1].line == data[:data.index(b"\xff")].count(b"\n") + 1
    (tmp_path / "data.txt").write_text(f"{tmp_path / 'd.json'} 0.002\n{tmp_path / 'd.json'} -1\n")
    with pytest.raises(DataError, match=r"data.txt:2: sample count -1 must be >= 0"):
        src_lib.load_xcomposer(str(tmp_path / "data.txt"))


# ---------------------------------------------------------------------------------- the row budget


@pytest.fixture(scope="module")
def tok():
    return build_qwen_test_tokenizer()


def _budget_cfg(meta, **kw):
    c = default_data_config()
    c.update(dict(meta_path=meta, image_size=28, num_image_token=2, max_length=512, pack_max_length=512,
                  max_tiles_per_pack=16, max_dynamic_patch=6, template="internvl2_5"))
    c.update(kw)
    return c


def _many_images(tmp_path, n):
    names = [f"i{k}.png" for k in range(n)]
    make_images(tmp_path / "img", names, size=(200, 40))
    q = "".join(f"Image-{k + 1}: <image>\n" for k in range(n)) + "Same?"
    return {"image": names, "conversations": conv(q, "No.")}


def test_a_record_over_the_row_budget_is_found_before_step_one(tmp_path, tok):
    ok = {"conversations": conv("Hi", "Hello")}
    meta = write_meta(tmp_path, {"ds": ([ok, _many_images(tmp_path, 20), ok], {})})
    ann = tmp_path / "ds.jsonl"
    with pytest.raises(DataError, match=rf"{ann}:2: over the row budget: 20 images, at least 20 tiles, a row holds 16"):
        SampleSource(_budget_cfg(meta), tok)
    skipping = SampleSource(_budget_cfg(meta, on_oversize="skip", max_skip_fraction=0.5), tok)
    assert len(skipping) == 2 and "over the row budget" in skipping.skip_summary()
    stats, bad, _ = run_check(_budget_cfg(meta), tok)
    assert bad == [(f"{ann}:2", "over the row budget: 20 images, at least 20 tiles, a row holds 16 "
                                "(data.max_tiles_per_pack)")]


def test_a_sample_over_the_row_budget_when_built_names_its_record(tmp_path, tok):
    """4 wide images are 4 records' worth of tiles only once their sizes are read: found when the
    sample is built, an error naming file:line, or a counted skip."""
    ok = {"conversations": conv("Hi", "Hello")}
    meta = write_meta(tmp_path, {"ds": ([ok, _many_images(tmp_path, 4)] + [ok] * 98, {})})
    source = SampleSource(_budget_cfg(meta, max_tiles_per_pack=6, max_dynamic_patch=12), tok)
    assert source[0] is not None
    with pytest.raises(DataError, match=rf"{tmp_path / 'ds.jsonl'}:2: over the row budget: \d+ tokens and \d+ tiles, "
                                        "a row holds 512 tokens and 6 tiles"):
        source[1]
    skipping = SampleSource(_budget_cfg(meta, max_tiles_per_pack=6, max_dynamic_patch=12, on_oversize="skip",
                                        max_skip_fraction=0.5), tok)
    assert skipping[1] is None and skipping.skipped() == 1


def test_max_length_past_the_packed_row_is_refused_unless_skipping(tmp_path, tok):
    meta = write_meta(tmp_path, {"ds": ([{"conversations": conv("Hi", "Hello")}], {})})
    with pytest.raises(DataError, match=r"data.max_length=1024 > data.pack_max_length=512"):
        SampleSource(_budget_cfg(meta, max_length=1024), tok)
    assert len(SampleSource(_budget_cfg(meta, max_length=1024, on_oversize="skip"), tok)) == 1


def test_an_export_killed_between_its_renames_is_recovered(tmp_path):
    """Killed after the old export was moved aside and before the new one took its place: the next
    export first puts the newest complete one back, so a failure then still leaves a whole export."""
    def complete(name, version):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_text(version)
        (d / run_lib.COMPLETE_MARKER).write_text("complete\n")

    complete("hf.old-11", "v1")
    complete("hf.tmp-12", "v2")
    (tmp_path / "hf.tmp-13").mkdir()   # an export killed while writing: no marker

    def fail(d):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(d, "model.safetensors"))

    with pytest.raises(OSError):
        run_lib.write_atomically(str(tmp_path / "hf"), fail)
    assert (tmp_path / "hf" / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("hf.tmp-")) == ["hf"]


# ---------------------------------------------------------------------------------- resume and the workdir


def test_resume_refuses_a_run_of_other_settings_unless_allowed(assets, tmp_path, capsys):
    wd = new_workdir(assets, tmp_path, "resume")
    run_lib.train(tiny_config(total_steps=2, **{"export.hf": False}), str(wd))
    before = sorted(os.listdir(wd / "checkpoints"))
    with pytest.raises(ConfigError, match=r"checkpoints/2 was written by a run with other settings: "
                                          r"data.max_skip_fraction 0.01 -> 0.5, seed 42 -> 7; .*"
                                          r"--config.resume.allow_changes=data.max_skip_fraction,seed"):
        run_lib.train(tiny_config(total_steps=4, seed=7, **{"data.max_skip_fraction": 0.5, "export.hf": False}),
                      str(wd))
    assert sorted(os.listdir(wd / "checkpoints")) == before
    capsys.readouterr()
    out = run_lib.train(tiny_config(total_steps=3, seed=7, **{"data.max_skip_fraction": 0.5, "export.hf": False,
                                                              "resume.allow_changes": "seed,data"}), str(wd))
    text = capsys.readouterr().out
    assert "resuming with changed settings: data.max_skip_fraction 0.01 -> 0.5, seed 42 -> 7, total_steps 2 -> 3" in text
    assert f"resumed from {wd / 'checkpoints'}/2" in text and out["step"] == 3


def test_resume_notices_data_files_that_changed_under_the_same_config(assets, tmp_path):
    wd = new_workdir(assets, tmp_path, "data_changed")
    spec = next(iter(json.loads((assets / "assets" / "data" / "meta.json").read_text()).values()))
    lines = Path(spec["annotation"]).read_text().splitlines()
    ann, meta = tmp_path / "mine.jsonl", tmp_path / "meta.json"
    ann.write_text("\n".join(lines[:40]) + "\n")
    meta.write_text(json.dumps({"mine": dict(spec, annotation=str(ann), length=None)}))
    cfg = lambda steps: tiny_config(total_steps=steps, **{"data.meta_path": str(meta), "export.hf": False})
    run_lib.train(cfg(2), str(wd))
    ann.write_text("\n".join(lines[:48]) + "\n")   # more records, same file name
    with pytest.raises(ConfigError, match=r"data.fingerprint.records.mine 40 -> 48, data.fingerprint.samples 40 -> 48"):
        run_lib.train(cfg(3), str(wd))


def _corrupt(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(os.urandom(64))


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(assets, tmp_path, capsys):
    wd = new_workdir(assets, tmp_path, "corrupt")
    extra = {"checkpoint.every_steps": 1, "checkpoint.keep": 2, "export.hf": False}
    run_lib.train(tiny_config(total_steps=3, **extra), str(wd))
    ref = read_losses(wd)
    _corrupt(wd / "checkpoints" / "3")
    capsys.readouterr()
    out = run_lib.train(tiny_config(total_steps=4, **extra), str(wd))
    text = capsys.readouterr().out
    assert f"warning: checkpoint {wd / 'checkpoints'}/3 cannot be read" in text
    assert f"set aside as {wd / 'checkpoints'}/3.corrupt, resuming from step 2" in text
    assert out["step"] == 4 and (wd / "checkpoints" / "3.corrupt").is_dir()
    assert read_losses(wd)[3] == ref[3]   # step 3 again, from step 2's checkpoint: the same loss
    # nothing intact left: an error, not a silent fresh start
    for step in os.listdir(wd / "checkpoints"):
        if step.isdigit():
            _corrupt(wd / "checkpoints" / step)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: step 4 cannot be read"):
        run_lib.train(tiny_config(total_steps=5, **extra), str(wd))


def test_a_second_run_in_the_same_workdir_is_refused(assets, tmp_path):
    wd = new_workdir(assets, tmp_path, "locked")
    with WorkdirLock(str(wd)):
        with pytest.raises(ConfigError, match=rf"workdir {wd} is in use by another run \(pid {os.getpid()} on "):
            run_lib.train(tiny_config(), str(wd))
    with WorkdirLock(str(wd)):   # released when its holder ends
        pass


def test_sigint_asks_once_then_interrupts():
    """Ctrl-C: the first asks the loop to stop after the step in flight; a second stops at once."""
    from mmjax.train.preemption import StopRequest
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(2) and stop.signame == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
