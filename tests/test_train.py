"""Acceptance tests of the trainer (mmjax/train): resume after SIGKILL, freezing, gradient
accumulation, chunked cross-entropy, the non-finite guard, HF export and config validation.

Everything runs on a much smaller variant of configs/tiny.py (see ``OVERRIDES``); the synthetic
assets (data, tokenizer, random initial checkpoint) are generated once per module and copied into
each run's workdir.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.data.batch import IGNORE_INDEX
from mmjax.data.embedded import prepare_embedded
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import loss as loss_lib
from mmjax.train import run as run_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib
from mmjax.train.setup import ConfigError, Run, build_run, model_options, validate_config

REPO = Path(__file__).resolve().parents[1]

# a much smaller tiny config: ~30 s per full run on 2 CPU cores, mostly compilation
OVERRIDES = {
    "synthetic.num_train": 64,
    "synthetic.num_eval": 8,
    "synthetic.vision.hidden_size": 32,
    "synthetic.vision.num_hidden_layers": 2,
    "synthetic.vision.num_attention_heads": 2,
    "synthetic.vision.intermediate_size": 64,
    "synthetic.llm.hidden_size": 64,
    "synthetic.llm.num_hidden_layers": 2,
    "synthetic.llm.num_attention_heads": 4,
    "synthetic.llm.num_key_value_heads": 2,
    "synthetic.llm.intermediate_size": 128,
    "data.batch_size": 2,
    "data.pack_max_length": 256,
    "data.max_tiles_per_pack": 16,
    "total_steps": 6,
    "checkpoint.every_steps": 2,
    "eval.enabled": False,
}
RESUME_STEPS = 30  # long enough to SIGKILL a run in the middle (steps take ~30 ms, saves longer)


def tiny_config(**extra):
    spec = importlib.util.spec_from_file_location("_tiny_config", REPO / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update_from_flattened_dict({**OVERRIDES, **extra})
    return cfg


def cli_args(**extra) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A workdir whose ``assets`` folder (data, tokenizer, init checkpoint) is generated once."""
    base = tmp_path_factory.mktemp("train_assets")
    prepare_embedded(tiny_config(), str(base))
    return base


def new_workdir(assets: Path, root: Path, name: str) -> Path:
    wd = root / name
    shutil.copytree(assets / "assets", wd / "assets")
    return wd


def read_losses(workdir: Path) -> dict[int, float]:
    """step -> the last ``train/loss`` written for that step (a resumed run re-logs steps)."""
    out = {}
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if "train/loss" in r:
                out[r["step"]] = r["train/loss"]
    return out


def max_logged_step(workdir: Path) -> int:
    p = workdir / "metrics.jsonl"
    if not p.exists():
        return 0
    steps = [0]
    for line in p.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return max(steps)


def build(cfg, assets: Path, **kw) -> Run:
    """The run ``run.train`` would build for ``cfg`` (assets generated once, reused)."""
    return build_run(cfg, workdir=str(assets), **kw)


def next_batch(run: Run) -> dict:
    return run.to_global(next(run.loader))


def restore_params(cfg, assets: Path, workdir: Path, step: int | None = None):
    """(run, restored TrainState, saved config) of a run's checkpoint."""
    run = build(cfg, assets, with_data=False)
    ck = ckpt_lib.RunCheckpointer(str(workdir / "checkpoints"), every_steps=1, keep=100, async_save=False)
    try:
        step = ck.latest_step() if step is None else step
        state, _, config = ck.restore(step, run.state)
    finally:
        ck.close()
    return run, state, config


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------------------------
# resume


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """An uninterrupted run of RESUME_STEPS steps (exported as float32 HF weights)."""
    wd = new_workdir(assets, tmp_path_factory.mktemp("ref"), "run")
    result = run_lib.train(tiny_config(total_steps=RESUME_STEPS), str(wd))
    assert result["step"] == RESUME_STEPS
    return wd


def test_resume_after_sigkill_is_bit_identical(assets, reference_run, tmp_path, capsys):
    wd = new_workdir(assets, tmp_path, "killed")
    ckdir = wd / "checkpoints"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py", f"--workdir={wd}",
         *cli_args(total_steps=RESUME_STEPS)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    killed_mid_save = False
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            s = max_logged_step(wd)
            saving = bool(glob.glob(str(ckdir / "*.orbax-checkpoint-tmp")))
            done = [d for d in glob.glob(str(ckdir / "*")) if os.path.basename(d).isdigit()]
            # prefer a kill while orbax writes a checkpoint after a first one is complete;
            # otherwise any time after step 8
            if (s >= 3 and saving and done) or s >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_mid_save = saving
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed_mid_save:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = max_logged_step(wd)
    assert 3 <= killed_at < RESUME_STEPS

    # the previous checkpoint is complete and the latest visible one; partial saves are invisible
    ck = ckpt_lib.RunCheckpointer(str(ckdir), every_steps=2, keep=1, async_save=False)
    latest = ck.latest_step()
    ck.close()
    assert latest is not None and latest % 2 == 0 and latest <= killed_at + 1
    if not glob.glob(str(ckdir / "*.orbax-checkpoint-tmp")):
        # the kill missed orbax's write window: leave a partial save of the next step behind by hand
        partial = ckdir / f"{latest + 2}.orbax-checkpoint-tmp"
        (partial / "state").mkdir(parents=True)
        (partial / "state" / "garbage").write_bytes(b"\0" * 100)

    capsys.readouterr()
    result = run_lib.train(tiny_config(total_steps=RESUME_STEPS), str(wd))
    out = capsys.readouterr().out
    assert f"resumed from {ckdir}/{latest}" in out
    assert result["step"] == RESUME_STEPS

    ref, got = read_losses(reference_run), read_losses(wd)
    assert sorted(ref) == list(range(1, RESUME_STEPS + 1))
    assert sorted(got) == sorted(ref)
    diff = {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]}
    assert not diff, f"losses differ after resume (killed at step {killed_at}, mid-save={killed_mid_save}): {diff}"
    assert len(set(ref.values())) > 1  # a loss that moves, so equality means something
    assert not glob.glob(str(ckdir / "*.orbax-checkpoint-tmp"))


def test_a_signal_saves_the_step_in_flight_and_the_restart_is_bit_identical(assets, reference_run, tmp_path,
                                                                           sig=signal.SIGTERM):
    """SIGTERM (preemption): the step in flight finishes, its checkpoint (state + data iterator) is
    written, one line says so, the exit status is EXIT_PREEMPTED; the same command again continues
    to the uninterrupted run's losses exactly. (Ctrl-C takes the same path: its handler is tested
    in tests/test_reliability.py.)"""
    from mmjax.train.preemption import EXIT_PREEMPTED
    wd = new_workdir(assets, tmp_path, "signalled")
    log_path = tmp_path / "signalled.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py", f"--workdir={wd}",
             *cli_args(total_steps=RESUME_STEPS, **{"checkpoint.every_steps": 1000})],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and max_logged_step(wd) < 3:
                time.sleep(0.01)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = log_path.read_text()
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    ck = ckpt_lib.RunCheckpointer(str(wd / "checkpoints"), every_steps=1000, keep=1, async_save=False)
    saved = ck.latest_step()
    ck.close()
    assert saved is not None and 3 <= saved < RESUME_STEPS        # not a periodic save: every_steps is 1000
    lines = [ln for ln in out.splitlines() if ln.startswith("stopped by")]
    assert lines == [f"stopped by {signal.Signals(sig).name} after step {saved}: checkpoint "
                     f"{wd / 'checkpoints'}/{saved} saved; run the same command again to resume"], out[-2000:]
    assert max_logged_step(wd) == saved                           # the last step's metrics were written
    result = run_lib.train(tiny_config(total_steps=RESUME_STEPS), str(wd))
    assert result["step"] == RESUME_STEPS
    ref, got = read_losses(reference_run), read_losses(wd)
    assert sorted(got) == sorted(ref)
    assert {s: (ref[s], got[s]) for s in ref if ref[s] != got[s]} == {}


def test_an_interrupted_export_leaves_the_previous_one_whole(tmp_path):
    """Exports go to a directory beside the target and are swapped in whole with a completion
    marker: a failure in the middle of writing leaves the previous export untouched."""
    target = tmp_path / "hf"

    def write(version, fail=False):
        def go(d):
            (Path(d) / "model-00001.safetensors").write_text(f"shard 1 of {version}")
            if fail:
                raise OSError("disk full")
            (Path(d) / "model-00002.safetensors").write_text(f"shard 2 of {version}")
        return go

    run_lib.write_atomically(str(target), write("v1"))
    with pytest.raises(OSError, match="disk full"):
        run_lib.write_atomically(str(target), write("v2", fail=True))
    assert sorted(p.name for p in target.iterdir()) == sorted([run_lib.COMPLETE_MARKER, "model-00001.safetensors",
                                                               "model-00002.safetensors"])
    assert {p.read_text() for p in target.glob("model-*")} == {"shard 1 of v1", "shard 2 of v1"}
    partial = [p for p in tmp_path.iterdir() if p.name.startswith("hf.tmp-")]
    assert partial and not (partial[0] / run_lib.COMPLETE_MARKER).exists()   # never mistaken for whole
    run_lib.write_atomically(str(target), write("v3"))
    assert {p.read_text() for p in target.glob("model-*")} == {"shard 1 of v3", "shard 2 of v3"}
    assert (target / run_lib.COMPLETE_MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]   # the partial one is cleared by the next export


def test_export_reloads_with_identical_logits(assets, reference_run):
    import mmjax

    cfg = tiny_config(total_steps=RESUME_STEPS)
    run, state, saved_cfg = restore_params(cfg, assets, reference_run)
    assert int(state.step) == RESUME_STEPS
    assert saved_cfg["total_steps"] == RESUME_STEPS
    trained = run.model(state.params)

    fresh = build(tiny_config(total_steps=RESUME_STEPS), assets)
    batch = next_batch(fresh)
    fresh.loader.close()
    # the run's own model options (attention backend, block, ...): same computation, other weights file
    options = model_options(cfg, fresh.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    exported = mmjax.from_pretrained(str(reference_run / "hf"), dtype="float32", options=options)
    # the export holds the trained weights, not the initial ones
    assert tree_equal(nnx.state(exported, nnx.Param), nnx.state(trained, nnx.Param))
    assert not tree_equal(nnx.state(fresh.model(), nnx.Param), nnx.state(trained, nnx.Param))

    def logits(m):
        h, mismatch = step_lib.model_hidden(m, batch, None, train=False)
        assert not bool(mismatch)
        return np.asarray(step_lib.language_model(m).logits(h))

    a, b = logits(trained), logits(exported)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# freezing


def _paths(state) -> list[str]:
    return [state_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def test_frozen_backbone_and_mlp_stay_bit_identical(assets, tmp_path):
    from safetensors.numpy import load_file

    extra = {"freeze.backbone": True, "freeze.mlp": True, "freeze.llm": False, "total_steps": 3,
             "export.dtype": "float32"}
    wd = new_workdir(assets, tmp_path, "frozen")
    run_lib.train(tiny_config(**extra), str(wd))
    init = load_file(str(wd / "assets" / "init" / "model.safetensors"))
    out = load_file(str(wd / "hf" / "model.safetensors"))
    assert set(init) == set(out)
    frozen_keys = [k for k in init if k.startswith(("vision_model.", "mlp1."))]
    llm_keys = [k for k in init if k.startswith("language_model.")]
    assert frozen_keys and llm_keys and len(frozen_keys) + len(llm_keys) == len(init)
    for k in frozen_keys:
        assert out[k].dtype == init[k].dtype and np.array_equal(out[k], init[k]), k
    changed = [k for k in llm_keys if not np.array_equal(out[k], init[k])]
    assert changed == llm_keys  # AdamW with decay moves every trained tensor

    # the optimizer state covers exactly the trainable params (Adam: mu and nu)
    run = build(tiny_config(**extra), assets, with_data=False)
    trainable, frozen, st = run.state.params, run.frozen, run.state
    assert all(p.startswith("language_model") for p in _paths(trainable))
    assert any(p.startswith("vision_model") for p in _paths(frozen))
    assert any(p.startswith("mlp1") for p in _paths(frozen))
    opt_arrays = [x for x in jax.tree.leaves(st.opt_state) if np.ndim(x) > 0]
    assert len(opt_arrays) == 2 * len(jax.tree.leaves(trainable))
    assert sum(x.size * x.dtype.itemsize for x in opt_arrays) == 2 * state_lib.state_bytes(trainable)
    assert state_lib.count_params(trainable) + state_lib.count_params(frozen) == \
        state_lib.count_params(nnx.state(run.model(), nnx.Param))
    assert not any("vision_model" in p or "mlp1" in p for p in _paths(st.opt_state))


def _train_steps(run: Run, n: int):
    """(params before, state after ``n`` steps of ``run.step_fn`` on loader batches)."""
    st = run.state
    p0 = jax.tree.map(np.asarray, st.params)
    for _ in range(n):
        st, m = run.step_fn(st, run.frozen, run.rest, next_batch(run))
        assert int(m["train/skipped"]) == 0
    run.loader.close()
    return dict(jax.tree_util.tree_flatten_with_path(p0)[0]), st


def test_unfreeze_last_vit_layer(assets):
    run = build(tiny_config(**{"freeze.backbone": True, "freeze.unfreeze_vit_layers": -1, "total_steps": 4}), assets)
    vit_train = [p for p in _paths(run.state.params) if p.startswith("vision_model")]
    assert vit_train and all(p.startswith("vision_model/layers") for p in vit_train)
    assert any(p.startswith("vision_model") for p in _paths(run.frozen))  # embeddings stay frozen
    flat0, st = _train_steps(run, 2)   # step 0 has lr 0 (warmup)
    n_checked = 0
    for path, new in jax.tree_util.tree_flatten_with_path(st.params)[0]:
        name, old, new = state_lib.path_str(path), flat0[path], np.asarray(new)
        if name.startswith("vision_model/layers"):
            assert new.shape[0] == 2
            np.testing.assert_array_equal(new[0], old[0], err_msg=name)   # layer 0 frozen
            assert not np.array_equal(new[1], old[1]), name               # layer 1 trains
            n_checked += 1
    assert n_checked == len(vit_train)


def test_vit_lora_with_unfreeze_vit_layers_trains_every_adapter(assets):
    """ViT LoRA + ``unfreeze_vit_layers=-1`` (upstream: adapters on the whole backbone, and the base
    weights of the last layer trained too): every layer's adapters move, base layer 0 stays put."""
    extra = {"lora.vit_rank": 2, "lora.dropout": 0.0, "freeze.unfreeze_vit_layers": -1, "total_steps": 4,
             "optim.warmup_ratio": 0.0}
    run = build(tiny_config(**extra), assets)
    flat0, st = _train_steps(run, 2)
    adapters = base = 0
    for path, new in jax.tree_util.tree_flatten_with_path(st.params)[0]:
        name, old, new = state_lib.path_str(path), flat0[path], np.asarray(new)
        if not name.startswith("vision_model/layers"):
            continue
        if "/lora_b" in name:          # zero-initialised: moves only if it gets updates
            assert all(np.abs(new[i]).max() > 0 for i in range(new.shape[0])), name
            adapters += 1
        elif "/lora_a" not in name:
            np.testing.assert_array_equal(new[0], old[0], err_msg=name)   # base layer 0 frozen
            assert not np.array_equal(new[1], old[1]), name               # base layer 1 trains
            base += 1
    assert adapters >= 4 and base > 0   # qkv, proj, fc1, fc2 adapters; the last layer's base weights


@pytest.mark.parametrize("vit_lora", [False, True])
def test_vit_layers_after_select_layer_get_no_decay_and_no_update(assets, vit_lora):
    """InternVL reads hidden_states[select_layer]: the layers after it get no gradient, and PyTorch's
    AdamW skips a parameter without one (no weight decay either). With ``select_layer=-2`` on the
    tiny 2-layer ViT, layer 1 (base weights and adapters) must stay put while layer 0 trains."""
    config = json.loads((assets / "assets" / "init" / "config.json").read_text())
    config["select_layer"] = -2
    extra = {"optim.weight_decay": 0.1, "optim.warmup_ratio": 0.0, "total_steps": 4}
    if vit_lora:
        extra.update({"lora.vit_rank": 2, "lora.dropout": 0.0})
    run = build_run(tiny_config(**extra), workdir=str(assets), hf_config=config)
    flat0, st = _train_steps(run, 2)
    checked = 0
    for path, new in jax.tree_util.tree_flatten_with_path(st.params)[0]:
        name, old, new = state_lib.path_str(path), flat0[path], np.asarray(new)
        if not name.startswith("vision_model/layers"):
            continue
        np.testing.assert_array_equal(new[1], old[1], err_msg=name)   # after select_layer: untouched
        if "/lora_a" not in name:      # lora_a of layer 0 moves only once lora_b is non-zero
            assert not np.array_equal(new[0], old[0]), name           # layer 0 trains
        checked += 1
    assert checked >= (8 if vit_lora else 4)


# ---------------------------------------------------------------------------------------------
# gradient accumulation, cross-entropy


def test_grad_accum_matches_one_big_batch(assets):
    run = build(tiny_config(**{"data.batch_size": 8}), assets)
    batch = next_batch(run)
    run.loader.close()
    assert batch["input_ids"].shape[0] == 8 and batch["image_flags"].shape[0] == batch["pixel_values"].shape[0]
    trainable = run.state.params
    tx, schedule = optax.sgd(1.0), (lambda s: jnp.ones((), jnp.float32))  # params moved by -grad
    results = {}
    for ga in (4, 1):
        f = jax.jit(step_lib.make_train_step(run.graphdef, tx, schedule, grad_accum=ga, chunk_size=100))
        st, m = f(step_lib.init_state(trainable, tx, 0), run.frozen, run.rest, batch)
        assert int(m["train/skipped"]) == 0 and int(m["train/image_token_mismatch"]) == 0
        results[ga] = (float(m["train/loss"]), jax.tree.map(np.asarray, st.params), m)
    (l4, p4, m4), (l1, p1, m1) = results[4], results[1]
    assert np.isfinite(l1) and l1 > 0
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    assert float(m4["train/supervised_tokens"]) == float(m1["train/supervised_tokens"]) > 0
    assert float(m4["train/token_accuracy"]) == float(m1["train/token_accuracy"])
    np.testing.assert_allclose(float(m4["train/grad_norm"]), float(m1["train/grad_norm"]), rtol=1e-5)
    p0 = jax.tree.map(np.asarray, trainable)
    for (path, a), b, c in zip(jax.tree_util.tree_flatten_with_path(p4)[0], jax.tree.leaves(p1), jax.tree.leaves(p0)):
        name = state_lib.path_str(path)
        g4, g1 = c - a, c - b   # the gradients (sgd, lr 1)
        # float32 sums of four micro-batch gradients vs one: rounding is relative to the tensor's
        # scale, not to each element (an element that nearly cancels can differ by 1e-4 of itself);
        # a wrong normalisation or a dropped micro-batch is off by tens of percent
        norm = max(float(np.linalg.norm(g1)), 1e-30)
        assert float(np.linalg.norm(g4 - g1)) <= 1e-4 * norm, name
        assert float(np.abs(g4 - g1).max()) <= 1e-4 * float(np.abs(g1).max()) + 1e-7 * norm, name


@pytest.mark.parametrize("transpose_head", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 20, 64])
def test_chunked_cross_entropy_matches_plain(chunk, transpose_head):
    b, t, h, v = 2, 10, 8, 37
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(k[0], (b, t, h))
    head = jax.random.normal(k[1], (h, v)) * 0.5
    targets = jax.random.randint(k[2], (b, t), 0, v)
    targets = targets.at[0, :3].set(IGNORE_INDEX).at[1, -1].set(IGNORE_INDEX)
    weights = jnp.where(targets == IGNORE_INDEX, 0.0, jax.random.uniform(k[3], (b, t)) + 0.5)

    def plain(hd, w):
        s, ws, c = loss_lib.cross_entropy(hd @ w, targets, weights)
        return s, (ws, c)

    def chunked(hd, w):   # the tied layout stores the head (vocab, hidden)
        s, ws, c = loss_lib.chunked_cross_entropy(hd, w.T if transpose_head else w, targets, weights, chunk,
                                                  transpose_head=transpose_head)
        return s, (ws, c)

    (s0, (w0, c0)), g0 = jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)(hidden, head)
    (s1, (w1, c1)), g1 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    assert float(s0) > 0 and int(c0) == int(c1) and float(w0) == float(w1)
    np.testing.assert_allclose(s1, s0, rtol=1e-5)
    for a, b_ in zip(g1, g0):
        assert float(jnp.abs(b_).max()) > 0
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    # an ignored position has no gradient
    np.testing.assert_array_equal(np.asarray(g1[0])[0, :3], 0.0)
    # not differentiated (evaluation): the same sums
    s2, _, c2 = loss_lib.chunked_cross_entropy(hidden, head.T if transpose_head else head, targets, weights, chunk,
                                               transpose_head=transpose_head)
    np.testing.assert_allclose(s2, s0, rtol=1e-5)
    assert int(c2) == int(c0)


@pytest.mark.parametrize("supervised", [0, 1, 5])
def test_chunked_cross_entropy_skips_chunks_without_targets(supervised):
    """Rows that are mostly prompt / image / padding: the supervised tokens are gathered first and
    the chunks left without one are skipped; sums and gradients are those of the plain loss (and
    all zero with nothing supervised)."""
    b, t, h, v, chunk = 2, 24, 8, 37, 4
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    hidden = jax.random.normal(k[0], (b, t, h))
    head = jax.random.normal(k[1], (h, v)) * 0.5
    keep = np.zeros((b, t), bool)
    keep[np.unravel_index(np.random.default_rng(0).choice(b * t, supervised, replace=False), (b, t))] = True
    targets = jnp.where(jnp.asarray(keep), jax.random.randint(k[2], (b, t), 0, v), IGNORE_INDEX)
    weights = jnp.where(jnp.asarray(keep), jax.random.uniform(k[3], (b, t)) + 0.5, 0.0)

    def plain(hd, w):
        return loss_lib.cross_entropy(hd @ w, targets, weights)[0]

    def chunked(hd, w):
        return loss_lib.chunked_cross_entropy(hd, w, targets, weights, chunk)[0]

    s0, g0 = jax.value_and_grad(plain, argnums=(0, 1))(hidden, head)
    s1, g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(s1, s0, rtol=1e-5)
    for a, b_ in zip(g1, g0):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)
    assert (float(s1) > 0) == (supervised > 0)
    # only the supervised positions' hidden states get a gradient
    np.testing.assert_array_equal(np.abs(np.asarray(g1[0])).sum(-1) > 0, keep)


def test_shift_targets_never_crosses_segments():
    labels = np.array([[10, 11, 12, 13, 20, 21, 22, 30, 0, 0],
                       [40, -100, 42, 43, 44, 50, 51, 52, 53, 54]])
    segs = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 0, 0],
                     [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    w_in = np.arange(1, 21, dtype=np.float32).reshape(2, 10)
    t, w = loss_lib.shift_targets(jnp.asarray(labels), jnp.asarray(w_in), jnp.asarray(segs))
    t, w = np.asarray(t), np.asarray(w)
    for r in range(2):
        for i in range(10):
            same = i + 1 < 10 and segs[r, i + 1] == segs[r, i] and segs[r, i] != 0
            want = labels[r, i + 1] if same else IGNORE_INDEX
            assert t[r, i] == want, (r, i)
            assert w[r, i] == (w_in[r, i + 1] if same and want != IGNORE_INDEX else 0.0), (r, i)
    assert t[0, 3] == IGNORE_INDEX and t[0, 6] == IGNORE_INDEX and t[1, 4] == IGNORE_INDEX
    assert t[0, 0] == 11 and t[1, 5] == 51


# ---------------------------------------------------------------------------------------------
# non-finite guard


def test_nan_batch_is_skipped_and_counted(assets):
    # no warmup: optax's schedule count does not advance on skipped steps, so after two skips
    # the good step would still run at the warmup's lr 0
    run = build(tiny_config(**{"total_steps": 10, "optim.warmup_ratio": 0.0, "grad_accum": 2,
                               "loss_chunk_size": 128}), assets)
    good = next_batch(run)
    run.loader.close()
    # NaN on the weight of a supervised token (a NaN on a masked position is rightly ignored)
    _, w = loss_lib.shift_targets(good["labels"], good["loss_weights"], good["segment_ids"])
    r, i = np.argwhere(np.asarray(w) > 0)[0]
    bad = dict(good)
    bad["loss_weights"] = good["loss_weights"].at[r, i + 1].set(jnp.nan)
    st0 = run.state
    p0 = jax.tree.map(np.asarray, st0.params)
    o0 = jax.tree.map(np.asarray, st0.opt_state)

    st, m = run.step_fn(st0, run.frozen, run.rest, bad)
    assert int(m["train/skipped"]) == 1 and int(m["train/nonfinite_streak"]) == 1
    assert not np.isfinite(float(m["train/loss"]))
    assert tree_equal(st.params, p0) and tree_equal(st.opt_state, o0)
    st, m = run.step_fn(st, run.frozen, run.rest, bad)
    assert int(m["train/skipped"]) == 1 and int(st.nonfinite_streak) == 2 and int(st.nonfinite_total) == 2
    assert tree_equal(st.params, p0)
    st, m = run.step_fn(st, run.frozen, run.rest, good)
    assert int(m["train/skipped"]) == 0 and int(st.nonfinite_streak) == 0 and int(st.nonfinite_total) == 2
    assert np.isfinite(float(m["train/loss"]))
    assert not tree_equal(st.params, p0)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(st.params))


def test_run_stops_after_max_nonfinite_steps(assets, tmp_path, monkeypatch):
    """Steps >= 3 get NaN loss weights (injected into the jitted step): the run stops at the
    streak limit with an error, and the last checkpoint holds the last good (finite) params."""
    orig = step_lib.make_train_step

    def poisoned(*args, **kwargs):
        f = orig(*args, **kwargs)

        def g(state, frozen, rest, batch):
            batch = dict(batch)
            batch["loss_weights"] = jnp.where(state.step >= 2, jnp.nan, batch["loss_weights"])
            return f(state, frozen, rest, batch)
        return g

    monkeypatch.setattr(step_lib, "make_train_step", poisoned)
    extra = {"total_steps": 10, "checkpoint.keep": 5, "max_nonfinite_steps": 2, "export.hf": False}
    wd = new_workdir(assets, tmp_path, "nan")
    with pytest.raises(run_lib.TrainingStopped, match="consecutive non-finite") as stopped:
        run_lib.train(tiny_config(**extra), str(wd))
    # steps 3 and 4 are skipped: the message says what the checkpoint holds, not "good"
    assert "Last finite update: step 2." in str(stopped.value)
    assert "holding the weights of step 2" in str(stopped.value)
    losses = read_losses(wd)
    assert np.isfinite(losses[1]) and np.isfinite(losses[2]) and not np.isfinite(losses[3])
    assert max(losses) < 10
    cfg = tiny_config(**extra)
    _, good, _ = restore_params(cfg, assets, wd, step=2)
    _, last, _ = restore_params(cfg, assets, wd)
    assert int(last.step) >= 2
    assert tree_equal(last.params, good.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last.params))
    assert not glob.glob(str(wd / "checkpoints" / "*.orbax-checkpoint-tmp"))


# ---------------------------------------------------------------------------------------------
# config validation


def test_unknown_config_key_fails_before_anything_runs(tmp_path):
    wd = tmp_path / "wd"
    p = subprocess.run([sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py",
                        "--config.no_such_key=1", f"--workdir={wd}"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "no_such_key" in p.stderr
    assert not wd.exists()  # no assets generated, nothing compiled


@pytest.mark.parametrize("steps", [0, -5])
def test_a_non_positive_total_steps_is_refused(steps):
    with pytest.raises(ConfigError, match=f"config.total_steps={steps}: must be > 0"):
        validate_config(tiny_config(total_steps=steps))


def test_batch_size_not_divisible_by_grad_accum(assets, tmp_path):
    cfg = tiny_config(**{"data.batch_size": 3, "grad_accum": 2})
    with pytest.raises(ConfigError, match="multiple of"):
        validate_config(cfg)
    # through train(): a real checkpoint directory, so only the batch arithmetic is wrong
    cfg = tiny_config(**{"data.batch_size": 3, "grad_accum": 2, "synthetic.enabled": False,
                         "model_path": str(assets / "assets" / "init")})
    with pytest.raises(ConfigError, match="grad_accum"):
        run_lib.train(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "checkpoints").exists()
    validate_config(tiny_config(**{"data.batch_size": 4, "grad_accum": 2}))  # fine


def test_attention_knobs_are_validated_and_reach_the_vit():
    for key, bad in [("model.vit_attention", "flash9"), ("model.vit_attention_block", -1), ("model.attention", "nope"),
                     ("model.token_chunk", -2), ("model.vit_tile_chunk", -1)]:
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            model_options(tiny_config(**{key: bad}))
    opts = model_options(tiny_config(**{"model.vit_attention": "xla", "model.vit_attention_block": 64,
                                        "model.token_chunk": 256, "model.vit_tile_chunk": 3}))
    from mmjax.models.internvit import InternViTConfig
    vit = opts.apply_vision(InternViTConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128))
    assert (vit.attention, vit.attention_block) == ("xla", 64)
    # the chunk sizes reach the decoder and the InternVL composition
    from mmjax.models import internvl
    from mmjax.models.families import config_from_hf
    from tests import hf_fixtures as F
    text = config_from_hf(F.build("qwen3")[1])
    ivl = opts.apply_internvl(internvl.InternVLConfig(vision=vit, text=text, layout="internvl_chat"))
    assert (ivl.tile_chunk, ivl.text.token_chunk) == (3, 256)


def test_missing_model_path_gives_download_hint(tmp_path):
    missing = tmp_path / "pretrained" / "InternVL2-1B"
    cfg = tiny_config(**{"synthetic.enabled": False, "model_path": str(missing)})
    with pytest.raises(ConfigError, match="huggingface-cli download OpenGVLab/InternVL2-1B"):
        validate_config(cfg)
    cfg = tiny_config(**{"synthetic.enabled": False, "model_path": ""})
    with pytest.raises(ConfigError, match="model_path is empty"):
        validate_config(cfg)
    # the CLI turns it into a one-line error and exit status 2
    p = subprocess.run([sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py",
                        "--config.synthetic.enabled=False", f"--config.model_path={missing}",
                        f"--workdir={tmp_path / 'wd'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "huggingface-cli download OpenGVLab/InternVL2-1B" in p.stderr


def test_lora_run_trains_only_adapters_and_exports_both_ways(assets, tmp_path):
    """A LoRA run (with LoRA dropout on): the optimizer state is exactly Adam's two moments of the
    LoRA parameters, the base stays untouched, and the run ends with a PEFT adapter plus a merged
    HF checkpoint whose weights equal base + scaling * A @ B."""
    import json as _json

    from safetensors.numpy import load_file

    from mmjax.models.lora import lora_param_count

    extra = {"lora.llm_rank": 4, "lora.vit_rank": 2, "lora.dropout": 0.1, "total_steps": 3,
             "export.dtype": "float32"}
    run = build(tiny_config(**extra), assets, with_data=False)
    model = run.model()
    n_lora = lora_param_count(model)
    trainable = run.state.params
    assert n_lora > 0 and state_lib.count_params(trainable) == n_lora + state_lib.count_params(
        nnx.state(model.mlp1, nnx.Param))   # tiny keeps the projector trainable (freeze.mlp False)
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.state.opt_state) if np.ndim(x) > 0)
    assert opt_bytes == 2 * 4 * state_lib.count_params(trainable)

    wd = new_workdir(assets, tmp_path, "lora")
    run_lib.train(tiny_config(**extra), str(wd))
    init = load_file(str(wd / "assets" / "init" / "model.safetensors"))
    merged = load_file(str(wd / "hf" / "model.safetensors"))
    adapter = load_file(str(wd / "hf_adapter" / "adapter_model.safetensors"))
    conf = _json.load(open(wd / "hf_adapter" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["peft_type"] == "LORA"
    key = "language_model.model.layers.0.attention.wqkv.weight"
    a = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_A.weight"]
    b = adapter[f"base_model.model.{key[:-len('.weight')]}.lora_B.weight"]
    assert np.abs(b).max() > 0                      # the adapter trained
    expect = init[key] + conf["lora_alpha"] / conf["r"] * (b @ a)
    np.testing.assert_allclose(merged[key], expect, rtol=1e-5, atol=1e-6)
    # untargeted base weights are untouched
    for k in ("language_model.model.tok_embeddings.weight", "language_model.output.weight",
              "vision_model.embeddings.patch_embedding.weight"):
        assert np.array_equal(merged[k], init[k]), k


# ---------------------------------------------------------------------------------------------
# the embedded default with the user's settings


def _user_meta(assets: Path, root: Path, n: int = 16) -> Path:
    """An InternVL meta + JSONL of ``n`` of the generated records, in a folder of its own."""
    src = assets / "assets" / "data"
    root.mkdir(parents=True, exist_ok=True)
    lines = (src / "train.jsonl").read_text().splitlines()[:n]
    (root / "mine.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"mine": {"root": str(src), "annotation": str(root / "mine.jsonl"), "data_augment": False,
                     "repeat_time": 1}}
    (root / "my_meta.json").write_text(json.dumps(meta))
    return root / "my_meta.json"


def test_embedded_default_checks_and_trains_on_an_explicit_meta_path(assets, tmp_path, capsys):
    meta = _user_meta(assets, tmp_path / "user")
    wd = new_workdir(assets, tmp_path, "mine")
    p = subprocess.run([sys.executable, "-m", "mmjax.data", "check", "--config=configs/tiny.py", f"--workdir={wd}",
                        *cli_args(**{"data.meta_path": meta})], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data: yours (data.meta_path)" in p.stdout
    total = [line.split() for line in p.stdout.splitlines() if line.startswith("TOTAL")][0]
    assert total[1] == "16"                      # the user's 16 records, not the 64 generated ones
    assert "mine" in p.stdout and "shapes_train" not in p.stdout

    capsys.readouterr()
    result = run_lib.train(tiny_config(**{"data.meta_path": str(meta), "total_steps": 2, "export.hf": False}),
                           str(wd))
    out = capsys.readouterr().out
    assert result["step"] == 2
    assert "16 samples" in out and "data: yours (data.meta_path)" in out


def test_checkpoint_template_used_when_the_config_names_none(assets, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(assets / "assets" / "init", ckpt)
    conf = json.loads((ckpt / "config.json").read_text())
    assert conf["template"] == "internlm2-chat"
    conf["template"] = "internvl2_5"            # not the tiny config's template
    (ckpt / "config.json").write_text(json.dumps(conf))
    base = {"model_path": str(ckpt), "total_steps": 2}
    run = build(tiny_config(**base, **{"data.template": ""}), assets)
    run.loader.close()
    assert run.cfg.data.template == "internvl2_5"
    assert any("from" in n and "internvl2_5" in n for n in run.notes)
    run = build(tiny_config(**base), assets, with_data=False)   # an explicit template wins
    assert run.cfg.data.template == "internlm2-chat"
    del conf["template"]
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="names no chat template"):
        build(tiny_config(**base, **{"data.template": ""}), assets, with_data=False)


# ---------------------------------------------------------------------------------------------
# several processes


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split()
                                 if "host_platform_device_count" not in f] +
                                [f"--xla_force_host_platform_device_count={devices}"])
    return env


def test_two_processes_of_four_devices_resume_on_one_process_of_eight(assets, tmp_path):
    """Two processes x 4 CPU devices (gloo) train one run on a (2,4,1) mesh and checkpoint; the
    same run resumed from its middle checkpoint on one process x 8 devices computes the same
    losses and weights (float32 reduction order aside); process 0's export holds exactly, bit for
    bit, the trained weights (the checkpoint both processes wrote, restored on one process and
    one device)."""
    import mmjax

    steps = 6
    extra = {**OVERRIDES, "total_steps": steps, "mesh.data": 2, "mesh.fsdp": 4, "data.batch_size": 8,
             "export.dtype": "float32", "checkpoint.every_steps": 3, "checkpoint.keep": 2,
             "checkpoint.async_save": False, "data.shard_mode": "rows"}
    two = new_workdir(assets, tmp_path, "two")
    port, result = _free_port(), tmp_path / "result"
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "multihost_worker.py"), str(port), "2", str(i),
                               str(two), str(result), *[f"{k}={json.dumps(v)}" for k, v in extra.items()]],
                              cwd=REPO, env=_worker_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2500:] for log in logs)
    out0, out1 = (json.loads(Path(f"{result}.{i}").read_text()) for i in range(2))
    assert out0["process_count"] == 2 and out0["step"] == out1["step"] == steps
    assert "hf_dir" in out0 and "hf_dir" not in out1   # process 0 writes
    got = read_losses(two)
    assert sorted(got) == list(range(1, steps + 1))

    # the same run from its step-3 checkpoint on one process with 8 devices
    one = tmp_path / "one"
    shutil.copytree(two, one, ignore=shutil.ignore_patterns("hf", "hf_adapter"))
    shutil.rmtree(one / "checkpoints" / str(steps))
    p = subprocess.run([sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py", f"--workdir={one}",
                        *[f"--config.{k}={v}" for k, v in extra.items()]],
                       cwd=REPO, env=_worker_env(8), capture_output=True, text=True, timeout=420)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {one / 'checkpoints'}/3" in p.stdout and "'fsdp': 4" in p.stdout
    resumed = read_losses(one)
    for s in range(4, steps + 1):
        assert resumed[s] == pytest.approx(got[s], rel=1e-6), s
    from safetensors.numpy import load_file
    a, b = ({k: v for f in sorted((w / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
            for w in (two, one))
    # not bit for bit: gloo's all-reduce across the processes sums the devices' partial gradients in
    # another order than one process's does (measured: 39 of 55 tensors differ, by <= 1.2e-7 of the
    # tensor's scale, after 3 steps); the export itself is exact (below)
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.abs(a[k] - b[k]).max() <= 1e-6 * np.abs(a[k]).max(), k

    cfg = tiny_config(total_steps=steps)
    run, state, _ = restore_params(cfg, assets, two)
    assert int(state.step) == steps
    options = model_options(cfg, run.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    exported = mmjax.from_pretrained(str(two / "hf"), dtype="float32", options=options)
    assert tree_equal(nnx.state(exported, nnx.Param), nnx.state(run.model(state.params), nnx.Param))


def test_cluster_detection_and_flag_errors():
    """Which launchers start a multi-process run, and one-line errors for flags that do not
    describe one (checked before JAX is touched)."""
    from mmjax.train.cluster import ClusterError, detected_cluster, initialize
    assert detected_cluster({}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None      # one task: one process
    assert detected_cluster({"OMPI_COMM_WORLD_SIZE": "4"}) == "open mpi"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu pod slice"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None            # a single-host TPU VM
    assert initialize(environ={}) is None
    with pytest.raises(ClusterError, match="go together"):
        initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ClusterError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ClusterError, match="must be host:port"):
        initialize("127.0.0.1", 2, 0)
    p = subprocess.run([sys.executable, "-m", "mmjax.train", "--config=configs/tiny.py", "--coordinator=h:1",
                        "--num_processes=2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --coordinator, --num_processes and --process_id go together (all three, or none to let a TPU "
        "pod slice or SLURM say them)"]
