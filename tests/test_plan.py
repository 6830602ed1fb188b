"""The memory planner (``python -m mmjax.plan``): the step compiled on abstract inputs, per-device
bytes that add up to the state's own, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmjax import plan as plan_lib
from mmjax.train import state as state_lib
from tests.test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_plan_of_the_embedded_default_adds_up():
    cfg = tiny_config(**{"data.batch_size": 2, "model.vit_tile_chunk": 0})
    plan = plan_lib.make_plan(cfg)
    parts = plan["per_device_bytes"]
    assert plan["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and "CPU" in plan["compiled_for"]
    assert parts["frozen parameters"] == 0              # the embedded default trains everything
    # AdamW: two float32 moments per trainable float32 parameter, plus its step counters
    n = parts["trainable parameters"]
    assert n > 0 and 2 * n <= parts["optimizer state"] <= 2 * n + 64
    # rows x tokens int32 ids, labels, ... and the tile slots' float32 pixels
    d = cfg.data
    pixels = d.batch_size * d.max_tiles_per_pack * d.image_size ** 2 * 3 * 4
    assert pixels < parts["batch"] < pixels + 16 * d.batch_size * d.pack_max_length * 4
    xla = plan["xla"]
    # the compiled step's arguments are exactly the state, frozen weights and batch (+ rng, counters)
    assert 0 <= parts["other state"] < 2 ** 16
    assert plan["total_bytes"] == xla["argument"] + xla["output"] - xla["alias"] + xla["temp"] > xla["argument"]
    assert all(f["fits"] for f in plan["fits"].values())
    text = plan_lib.format_plan(plan, "v5p")
    assert "total (peak estimate)" in text and "v5p" in text and "a100-80g" not in text


def test_unknown_checkpoint_without_config_json_is_a_one_line_error(tmp_path):
    cfg = tiny_config(**{"synthetic.enabled": False, "model_path": str(tmp_path / "my-model")})
    with pytest.raises(plan_lib.PlanError, match=r"config.json not found and 'my-model' is not a known checkpoint"):
        plan_lib.make_plan(cfg)
    p = subprocess.run([sys.executable, "-m", "mmjax.plan", "--config=configs/tiny.py", "--device=a100"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --device=a100: choose one of")


def test_known_checkpoints_give_the_planner_their_shapes():
    from mmjax.models.catalog import known_checkpoint
    config, img_context = known_checkpoint("pretrained/Mini-InternVL-Chat-2B-V1-5/")
    assert img_context == 92546 and config["llm_config"]["vocab_size"] == 92553
    config["llm_config"]["vocab_size"] = 1                          # a copy: the catalog is not changed
    assert known_checkpoint("Mini-InternVL-Chat-2B-V1-5")[0]["llm_config"]["vocab_size"] == 92553
    assert known_checkpoint("pretrained/InternVL-Chat-V1-5")[0]["vision_config"]["num_hidden_layers"] == 45
    assert known_checkpoint("pretrained/some-other-model") is None
