"""`python -m mmjax.data check|show` (exit codes and output)."""

import io
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from mmjax.data import __main__ as cli
from mmjax.data import default_data_config, load_tokenizer
from mmjax.data.tokenizer import build_qwen_test_tokenizer
from tests.test_data_sources import conv, make_images, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    build_qwen_test_tokenizer().save_pretrained(d / "tok")
    make_images(d / "img", ["a.png"], size=(100, 50))
    write_jsonl(d / "good.jsonl", [{"image": "a.png", "conversations": conv("<image>\nColour?", "Blue.")},
                                   {"conversations": conv("Hi", "Hello")}])
    write_jsonl(d / "bad.jsonl", [{"conversations": conv("Hi", "Hello")},
                                  {"image": "nope.png", "conversations": conv()}])
    for name in ("good", "bad"):
        meta = {name: dict(root=str(d / "img"), annotation=str(d / f"{name}.jsonl"), data_augment=False,
                           repeat_time=1)}
        (d / f"meta_{name}.json").write_text(json.dumps(meta))
        (d / f"cfg_{name}.py").write_text(
            "import ml_collections\n"
            "from mmjax.data import default_data_config\n\n"
            "def get_config():\n"
            "    c = ml_collections.ConfigDict()\n"
            f"    c.tokenizer_path = {str(d / 'tok')!r}\n"
            "    c.model_path = ''\n"
            "    c.data = default_data_config()\n"
            f"    c.data.meta_path = {str(d / f'meta_{name}.json')!r}\n"
            "    c.data.image_size = 28\n"
            "    c.data.num_image_token = 2\n"
            "    c.data.max_length = 512\n"
            "    c.data.system_message = 'S'\n"
            "    return c\n")
    return d


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mmjax.data", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def _config(workspace, name):
    c = ml_collections.ConfigDict()
    c.tokenizer_path = str(workspace / "tok")
    c.model_path = ""
    c.data = default_data_config()
    c.data.meta_path = str(workspace / f"meta_{name}.json")
    c.data.image_size, c.data.num_image_token, c.data.max_length, c.data.system_message = 28, 2, 512, "S"
    return c


def test_check_exit_codes_subprocess(workspace):
    bad = _run("check", f"--config={workspace / 'cfg_bad.py'}")
    assert bad.returncode == 1, bad.stderr[-2000:]
    assert f"{workspace / 'bad.jsonl'}:2: missing image:" in bad.stdout
    assert "1 bad record(s)" in bad.stdout
    good = _run("check", f"--config={workspace / 'cfg_good.py'}")
    assert good.returncode == 0, good.stderr[-2000:] + good.stdout
    assert "all records OK" in good.stdout


def test_check_counts_in_process(workspace):
    out = io.StringIO()
    assert cli.cmd_check(_config(workspace, "good"), out=out) == 0
    total = [l for l in out.getvalue().splitlines() if l.startswith("TOTAL")][0].split()
    # records, samples, bad, images, tiles (100x50 at 28 px -> 4x2 + thumb = 9), tokens, supervised, truncated
    assert total[1:6] == ["2", "2", "0", "1", "9"]
    tok = build_qwen_test_tokenizer()
    n_sup = sum(len(tok.encode(a + "<|im_end|>", add_special_tokens=False)) for a in ("Blue.", "Hello"))
    assert int(total[7]) == n_sup


def test_show_marks_supervised_spans(workspace):
    out = io.StringIO()
    assert cli.cmd_show(_config(workspace, "good"), 0, out=out) == 0
    text = out.getvalue()
    assert "grid 4x2 + thumbnail = 9 tiles" in text
    assert "⟦Blue.<|im_end|>⟧" in text
    assert "<img><IMG_CONTEXT>x18</img>" in text
    assert "⟦" not in text.split("⟦Blue.")[0]   # nothing before the answer is supervised
    with pytest.raises(cli.CliError, match="out of range"):
        cli.cmd_show(_config(workspace, "good"), 5, out=io.StringIO())


def test_missing_tokenizer_dir_is_clear(workspace):
    c = _config(workspace, "good")
    c.tokenizer_path = str(workspace / "no_such_dir")
    with pytest.raises(cli.CliError, match="config.tokenizer_path: tokenizer directory not found"):
        cli.cmd_check(c, out=io.StringIO())
    c.tokenizer_path, c.model_path = "", ""
    with pytest.raises(cli.CliError, match="neither tokenizer_path nor model_path"):
        cli.cmd_check(c, out=io.StringIO())


def test_load_tokenizer_roundtrip(workspace):
    t = load_tokenizer(str(workspace / "tok"))
    assert t.convert_tokens_to_ids("<IMG_CONTEXT>") == build_qwen_test_tokenizer().convert_tokens_to_ids("<IMG_CONTEXT>")
    assert t.pad_token == "<|endoftext|>"
