"""The training run: ``setup.build_run`` assembles it; this module is the loop over it (resume,
steps, metrics, checkpoints) and what follows it (HF / PEFT export, held-out evaluation).

``python -m mmjax.train --config=configs/<name>.py [--config.key=value] [--workdir=DIR]``
(the absl entry lives in ``mmjax/train/__main__.py``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from mmjax.data.batch import COUNT_KEYS
from mmjax.errors import UserError
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import preemption
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib
from mmjax.train.setup import Run, build_run


def train(cfg, workdir: str) -> dict:
    """Run (or resume) training; returns a summary dict (final step, last loss, exports, eval accuracy).
    One run at a time holds ``workdir`` (:mod:`mmjax.train.lock`)."""
    import contextlib
    from mmjax.train.lock import WorkdirLock
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(cfg, workdir)


def _train(cfg, workdir: str) -> dict:
    run = build_run(cfg, workdir=workdir)       # validates the config before anything is written
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                            every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                                            async_save=cfg.checkpoint.async_save)
    try:
        start = resume(run, checkpointer)
    except BaseException:
        checkpointer.close()
        run.loader.close()
        raise
    print(startup_summary(run, start), flush=True)
    writer = metrics_lib.MetricsWriter(workdir)
    try:
        with preemption.StopRequest() as stop:
            state, step, last, stop_reason = loop(run, checkpointer, writer, start, stop)
        if stop_reason == PREEMPTED:
            writer.close()
            raise preemption.Preempted(stop.signame, step, checkpointer.directory)
        if stop_reason:
            writer.close()
            checkpointer.manager.wait_until_finished()
            latest = checkpointer.latest_step()
            streak = int(last.get("train/nonfinite_streak", 0))
            last_update = int(last["step"]) - streak
            raise TrainingStopped(
                f"stopping at step {last['step']}: {stop_reason} (NaN / Inf loss or gradient; those updates were skipped). "
                + (f"Last finite update: step {last_update}. " if last_update > start else
                   f"No step of this run (from step {start}) was finite: the weights or the data are broken. ")
                + (f"Latest checkpoint: {checkpointer.directory}/{latest}, holding the weights of step "
                   f"{min(latest, last_update) if last_update > start else start}" if latest
                   else "No checkpoint was written"))
        if checkpointer.latest_step() != step:
            checkpointer.save(step, state, run.loader.get_state(), saved_config(run, checkpointer), force=True)
    finally:
        checkpointer.close()
        run.loader.close()
    result = {"step": step, "loss": last.get("train/loss")}
    model = host_model(run, state.params)
    result.update(export(run, model, workdir))
    if cfg.eval.enabled and jax.process_index() == 0:
        from mmjax.train.evaluate import evaluate_vqa
        acc = evaluate_vqa(model, run.tokenizer, cfg)
        writer.write(step, {"eval/accuracy": acc})
        result["eval/accuracy"] = acc
        print(f"held-out accuracy: {100 * acc:.1f}%", flush=True)
    writer.close()
    return result


def resume(run: Run, checkpointer: ckpt_lib.RunCheckpointer) -> int:
    """Restore the newest intact checkpoint written by this run's settings into ``run.state`` and the
    loader (:mod:`mmjax.train.resume`); returns its step (0: none)."""
    from mmjax.train.resume import restore_latest
    start, notes = restore_latest(run, checkpointer, saved_config(run, checkpointer))
    for note in notes:
        print(note, flush=True)
    if start:
        print(f"resumed from {checkpointer.directory}/{start}", flush=True)
    return int(start)


WORKDIR_MARK = "${workdir}"   # a saved path inside the run's workdir is kept relative to it


def saved_config(run: Run, checkpointer: ckpt_lib.RunCheckpointer) -> dict:
    """What a checkpoint records of its run: the config, with paths inside the workdir (the
    checkpoints directory's parent: the embedded default's generated checkpoint and data) written
    relative to it, so a workdir moved or copied elsewhere resumes; and under ``data.fingerprint``
    the number of records of each source and samples an epoch, so a resume notices data files that
    changed under an unchanged config (:mod:`mmjax.train.resume` compares them)."""
    root = os.path.dirname(checkpointer.directory) + os.sep

    def rel(v):
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        if isinstance(v, str) and os.path.isabs(v) and os.path.abspath(v).startswith(root):
            return os.path.join(WORKDIR_MARK, os.path.relpath(os.path.abspath(v), root))
        return v

    out = rel(ckpt_lib.config_json(run.cfg))
    source = getattr(run.dataset, "mmjax_source", None)
    if source is not None:
        out["data"]["fingerprint"] = {"samples": int(source.total_samples),
                                      "records": {s.name: len(s.records) for s in source.sources}}
    return out


class TrainingStopped(UserError):
    """The run stopped itself (too many non-finite steps); the message says what the checkpoints hold."""


PREEMPTED = "preempted"   # loop's stop reason after a signal (its checkpoint written)


def loop(run: Run, checkpointer, writer, start: int, stop_request: "preemption.StopRequest | None" = None):
    """Steps ``start -> run.total_steps``; returns (state, step, last metrics, stop reason or None).

    Metrics are fetched one step late, so the host never waits for the device in between. When
    ``stop_request`` asks (a signal), the step in flight finishes, its checkpoint is written (train state
    and data-iterator state) and the reason is ``PREEMPTED``."""
    cfg = run.cfg
    flops = flops_model(run.model(), cfg)
    peak = metrics_lib.peak_flops_per_device(cfg.peak_flops_per_device)
    progress = metrics_lib.Progress(run.total_steps, start)
    state, step, last, pending = run.state, start, {}, None
    run.state = None   # donated to the step from here on

    def finish(p):
        m = finish_metrics(p, writer, progress, flops, peak, cfg, run.total_steps)
        streak = int(m["train/nonfinite_streak"])
        m = dict(m, step=p[0])   # the step these metrics are of (they arrive one step late)
        return m, (f"{streak} consecutive non-finite steps" if streak >= cfg.max_nonfinite_steps else None)

    while step < run.total_steps:
        host = next(run.loader)
        run.check_token_ids(host)
        stats = {k: float(np.sum(host[k])) for k in COUNT_KEYS if k in host}
        state, m = run.step_fn(state, run.frozen, run.rest, run.to_global(host))
        step += 1
        if pending is not None:
            last, stop = finish(pending)
            if stop:
                return state, step, last, stop
        pending = (step, m, stats)
        saved = checkpointer.should_save(step)
        if saved:
            checkpointer.save(step, state, run.loader.get_state(), saved_config(run, checkpointer))
        if stop_request is not None and step < run.total_steps and stop_request.should_stop(step):
            last, _ = finish(pending)
            if not saved:
                checkpointer.save(step, state, run.loader.get_state(), saved_config(run, checkpointer), force=True)
            return state, step, last, PREEMPTED
    if pending is not None:
        last, stop = finish(pending)
        if stop:
            return state, step, last, stop
    return state, step, last, None


def host_model(run: Run, params):
    """The trained model with arrays this process can read whole: as they are on one device; on a
    multi-device or multi-process mesh gathered to host memory (every process takes part), so
    LoRA merging, export and evaluation are plain local computations."""
    trees = (params, run.frozen, run.rest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        trees = tuple(multihost_utils.process_allgather(t, tiled=True) for t in trees)
    elif jax.device_count() > 1:
        trees = jax.device_get(trees)
    return nnx.merge(run.graphdef, *trees)


COMPLETE_MARKER = ".mmjax-export-complete"   # written last into an export directory


def write_atomically(target: str, write) -> str:
    """``write(directory)`` into a fresh directory next to ``target``, files fsynced, a completion
    marker last, then swapped into place: a kill at any moment leaves the previous ``target``
    whole (or, between the two renames, absent with the new one complete beside it), never a mix
    of two exports."""
    import shutil
    path = os.path.abspath(target)
    recover_export(path)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
        f.write("complete\n")
    for name in os.listdir(tmp):
        fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover_export(path: str) -> None:
    """Tidy what an export killed midway left beside ``path``: when ``path`` is missing (killed
    between the two renames) the newest complete directory (the new one, else the previous one)
    takes its place; every other leftover (``.tmp-<pid>``, ``.old-<pid>``) is removed."""
    import glob
    import shutil
    left = sorted(glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"),
                  key=lambda p: (".tmp-" in p, os.path.getmtime(p)), reverse=True)
    if not os.path.exists(path):
        for candidate in left:
            if os.path.exists(os.path.join(candidate, COMPLETE_MARKER)):
                os.rename(candidate, path)
                left.remove(candidate)
                break
    for leftover in left:
        shutil.rmtree(leftover, ignore_errors=True)


def export(run: Run, model, workdir: str) -> dict:
    """PEFT adapter + merged model (LoRA) and the HF weights in the source layout; process 0 writes,
    each directory atomically (:func:`write_atomically`)."""
    cfg, out = run.cfg, {}
    if jax.process_index() == 0:
        import mmjax
        if run.use_lora:
            from mmjax.models.lora import merge_lora
            from mmjax.weights.peft_io import save_peft_adapter
            out["adapter_dir"] = write_atomically(os.path.join(workdir, "hf_adapter"), lambda d: save_peft_adapter(
                model, d, base_model_name_or_path=cfg.model_path))
            print(f"exported the PEFT adapter to {out['adapter_dir']}", flush=True)
            merge_lora(model)   # W + (alpha / r) B A, in the source layout below
        if cfg.export.hf:
            out["hf_dir"] = write_atomically(os.path.join(workdir, "hf"), lambda d: mmjax.save_pretrained(
                model, d, dtype=cfg.export.dtype))
            print(f"exported HF weights to {out['hf_dir']}", flush=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mmjax export")   # no process leaves before the files exist
    return out


def finish_metrics(pending, writer, progress, flops, peak, cfg, total_steps) -> dict:
    step, m, stats = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    dt = progress.tick()
    real = m["train/real_tokens"]
    rows_tokens = cfg.data.batch_size * cfg.data.pack_max_length
    m["perf/step_time_s"] = dt
    m["perf/tokens_per_s"] = real / dt
    m["perf/samples_per_s"] = stats.get("num_samples", 0.0) / dt
    m["perf/tiles_per_s"] = m["train/tiles"] / dt
    m["data/padding_fraction"] = 1.0 - real / max(rows_tokens, 1)
    if flops is not None:
        f = flops.step_flops(real, stats.get("num_samples", 1.0), m["train/tiles"])
        m["perf/tflops_per_s"] = f / dt / 1e12
        if peak:
            m["perf/mfu"] = f / dt / (peak * jax.device_count())
    if step % cfg.log_every == 0 or step == total_steps:
        progress.show(step, m)
    if m["train/skipped"]:
        print(f"warning: step {step} skipped: non-finite loss or gradient "
              f"({int(m['train/nonfinite_streak'])} in a row)", flush=True)
    writer.write(step, m)
    return m


def flops_model(model, cfg):
    lm = step_lib.language_model(model)
    c = lm.cfg
    emb = c.vocab_size * c.hidden_size
    dec_params = state_lib.count_params(nnx.state(lm, nnx.Param)) - emb * (1 if not c.tie_word_embeddings else 0)
    kw = dict(dec_params=dec_params, dec_layers=c.num_layers, dec_q_width=c.num_heads * c.head_dim)
    if hasattr(model, "vision_model"):
        v = model.vision_model.cfg
        grid = v.image_size // v.patch_size
        kw.update(vit_params=state_lib.count_params(nnx.state(model.vision_model, nnx.Param)),
                  vit_layers=v.num_layers, vit_width=v.hidden_size, vit_tokens_per_tile=grid * grid + 1,
                  vit_trained=not cfg.freeze.backbone or bool(cfg.freeze.unfreeze_vit_layers))
    return metrics_lib.FlopsModel(**kw)


def startup_summary(run: Run, start: int) -> str:
    cfg, state, mesh = run.cfg, run.state, run.mesh
    n_train = state_lib.count_params(state.params)
    n_frozen = state_lib.count_params(run.frozen)
    b_params = state_lib.state_bytes(state.params) + state_lib.state_bytes(run.frozen)
    b_opt = state_lib.state_bytes(state.opt_state)
    per_dev = (b_params + b_opt) / jax.device_count()
    lines = [
        f"mmjax train: {cfg.name}",
        f"  model      {cfg.model_path} ({run.model_type}), compute {cfg.model.dtype}, master {cfg.model.param_dtype}, "
        f"attention {cfg.model.attention}, remat {cfg.model.remat}",
        f"  params     total {n_train + n_frozen:,} | trainable {n_train:,} | frozen {n_frozen:,}",
        f"  data       {len(run.dataset):,} samples, template {cfg.data.template}, pack {cfg.data.pack_max_length} "
        f"tokens / {cfg.data.max_tiles_per_pack} tiles per row",
        f"  batch      {cfg.data.batch_size} rows x {cfg.data.pack_max_length} tokens, grad_accum {cfg.grad_accum}",
        f"  mesh       {dict(mesh.shape)} on {jax.device_count()} x {jax.devices()[0].device_kind}",
        f"  memory     params {b_params / 2**30:.2f} GiB + optimizer {b_opt / 2**30:.2f} GiB "
        f"~ {per_dev / 2**30:.2f} GiB per device before activations",
        f"  steps      {start} -> {run.total_steps}, lr {cfg.optim.lr}, warmup {cfg.optim.warmup_ratio:.0%}, "
        f"{cfg.optim.get('schedule', 'cosine')}",
    ]
    lines += [f"  {n}" for n in run.notes]
    return "\n".join(lines)
