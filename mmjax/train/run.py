"""The training run: config -> model + data + mesh -> jitted steps -> checkpoints -> HF export.

``python -m mmjax.train --config=configs/<name>.py [--config.key=value] [--workdir=DIR]``
(the absl entry lives in ``mmjax/train/__main__.py``; this module holds the logic).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import sharding as shd
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import optim as optim_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib

class ConfigError(ValueError):
    pass


def validate_config(cfg) -> None:
    """Impossible combinations and missing files fail here, before anything compiles."""
    if cfg.data.batch_size <= 0 or cfg.grad_accum <= 0 or cfg.data.batch_size % cfg.grad_accum:
        raise ConfigError(f"config.batch_size={cfg.data.batch_size} must be a positive multiple of "
                          f"config.grad_accum={cfg.grad_accum}")
    n_dev = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    if n_dev != jax.device_count():
        raise ConfigError(f"config.mesh data={cfg.mesh.data} x fsdp={cfg.mesh.fsdp} x tensor={cfg.mesh.tensor} "
                          f"= {n_dev} devices, but {jax.device_count()} are visible")
    micro = cfg.data.batch_size // cfg.grad_accum
    rows_axes = cfg.mesh.data * cfg.mesh.fsdp
    if micro % rows_axes:
        raise ConfigError(f"micro-batch of {micro} rows (batch_size / grad_accum) does not divide over "
                          f"data x fsdp = {rows_axes} devices")
    if cfg.model.remat not in ("none", "full", "dots", "dots_saveable"):
        raise ConfigError(f"config.model.remat={cfg.model.remat!r}: choose none, full, dots or dots_saveable")
    from mmjax.models.decoder import ATTENTION_BACKENDS
    if cfg.model.attention not in ATTENTION_BACKENDS:
        raise ConfigError(f"config.model.attention={cfg.model.attention!r}: choose one of {ATTENTION_BACKENDS}")
    if cfg.model.dtype not in ("float32", "bfloat16") or cfg.model.param_dtype not in ("float32", "bfloat16"):
        raise ConfigError("config.model.dtype / param_dtype must be 'float32' or 'bfloat16'")
    if cfg.freeze.backbone and cfg.freeze.mlp and cfg.freeze.llm and not (cfg.lora.llm_rank or cfg.lora.vit_rank) \
            and not cfg.freeze.unfreeze_vit_layers:
        raise ConfigError("every parameter is frozen (freeze.backbone, freeze.mlp, freeze.llm) and no LoRA rank "
                          "is set: nothing would train")
    if not cfg.synthetic.enabled:
        if not cfg.model_path:
            raise ConfigError("config.model_path is empty: point it at an HF checkpoint directory")
        if not os.path.isdir(cfg.model_path):
            name = os.path.basename(os.path.normpath(cfg.model_path))
            raise ConfigError(f"config.model_path {cfg.model_path} does not exist; download it with "
                              f"`huggingface-cli download OpenGVLab/{name} --local-dir {cfg.model_path}`")


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def prepare_synthetic(cfg, workdir: str) -> None:
    """The embedded default: generate data, tokenizer and a random initial checkpoint (once)."""
    from mmjax.data.synthetic import generate_shapes_dataset
    from mmjax.train.tiny import build_tiny_checkpoint

    assets = os.path.join(workdir, "assets")
    paths = generate_shapes_dataset(os.path.join(assets, "data"), cfg.synthetic.num_train,
                                    cfg.synthetic.num_eval, seed=cfg.seed)
    model_dir = build_tiny_checkpoint(cfg, os.path.join(assets, "init"), paths)
    with cfg.unlocked():
        cfg.model_path = model_dir
        cfg.data.meta_path = paths["meta"]
        cfg.eval.annotation = paths["eval"]
        cfg.eval.root = paths["root"]


def to_global(batch: dict, mesh) -> dict:
    """Host batch (this process's rows) -> global arrays sharded over rows on (data, fsdp)."""
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    return {k: jax.make_array_from_process_local_data(rows, np.asarray(batch[k]))
            for k in step_lib.ROW_KEYS}


def rows_view(batch: dict, batch_rows: int) -> dict:
    """Per-row tile layout: pixel_values (B, tiles_per_row, H, W, 3), image_flags (B, tiles_per_row)."""
    b = dict(batch)
    if "pixel_values" in b and b["pixel_values"].shape[0] != batch_rows:
        pv = b["pixel_values"]
        b["pixel_values"] = pv.reshape((batch_rows, -1) + pv.shape[1:])
        b["image_flags"] = b["image_flags"].reshape(batch_rows, -1)
    return b


def rows_per_sample(dataset, data_cfg, probe: int = 64, fill: float = 0.95) -> float:
    """Packed rows one sample occupies on average, from a seeded probe of the dataset: the
    tighter of the token and tile budgets, at the packer's typical fill. (Packing makes the
    number of steps per epoch data-dependent; upstream's packed mode asks the user for max_steps.)"""
    n = len(dataset)
    idx = np.random.default_rng(0).choice(n, size=min(probe, n), replace=False)
    tokens, tiles, seen = 0, 0, 0
    for i in idx:
        s = dataset[int(i)]
        if s is None:
            continue
        tokens += len(s["input_ids"])
        tiles += int(np.sum(s["image_flags"]))
        seen += 1
    if data_cfg.get("packing", "first_fit") == "none":
        return 1.0
    seen = max(seen, 1)
    by_tokens = tokens / seen / (data_cfg.pack_max_length * fill)
    by_tiles = tiles / seen / (data_cfg.max_tiles_per_pack * fill)
    return max(by_tokens, by_tiles)


def estimate_total_steps(cfg, dataset_len: int, rows_each: float) -> int:
    return max(math.ceil(cfg.num_epochs * dataset_len * rows_each / cfg.data.batch_size), 1)


def train(cfg, workdir: str) -> dict:
    """Run (or resume) training; returns a summary dict (final step, last loss, eval accuracy)."""
    import mmjax
    from mmjax.data import build_dataset, build_loader
    from mmjax.data.tokenizer import load_tokenizer
    from mmjax.weights import layouts
    from mmjax.weights.loader import read_config

    validate_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    if cfg.synthetic.enabled:
        prepare_synthetic(cfg, workdir)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)

    tokenizer = load_tokenizer(cfg.tokenizer_path or cfg.model_path)
    overrides = dict(drop_path_rate=cfg.model.drop_path_rate, remat=cfg.model.remat, attention=cfg.model.attention,
                     attention_block=cfg.model.attention_block)
    if layouts.detect_layout(read_config(cfg.model_path)[0]) != "causal_lm":
        # the id the data pipeline writes is the id the model must look for
        overrides["img_context_token_id"] = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = mmjax.from_pretrained(cfg.model_path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                  **overrides)
    has_vision = hasattr(model, "vision_model")
    use_lora = bool(cfg.lora.llm_rank or cfg.lora.vit_rank)
    if use_lora:
        from mmjax.models.lora import apply_lora
        apply_lora(model, llm_rank=cfg.lora.llm_rank, vit_rank=cfg.lora.vit_rank if has_vision else 0,
                   alpha_ratio=cfg.lora.alpha_ratio, dropout=cfg.lora.dropout,
                   llm_targets=tuple(cfg.lora.llm_targets) or None, vit_targets=tuple(cfg.lora.vit_targets),
                   rngs=cfg.seed)
    if has_vision:
        if not cfg.data.template:
            with cfg.unlocked():
                cfg.data.template = model.config.template

    dataset = build_dataset(cfg.data, tokenizer)
    loader = build_loader(cfg.data, tokenizer, dataset=dataset)

    # --- params: trainable vs frozen, placed on the mesh ---
    filt = state_lib.trainable_filter(state_lib.effective_freeze(cfg), has_vision)
    graphdef, trainable, frozen, rest = nnx.split(model, filt, nnx.Param, ...)
    frozen_dtype = _dtype(cfg.model.frozen_param_dtype)
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    trainable_sh = state_lib.param_shardings(trainable, mesh)
    frozen_sh = state_lib.param_shardings(frozen, mesh)
    trainable = jax.device_put(trainable, trainable_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    rest = jax.device_put(rest, state_lib.replicated(mesh))

    total_steps = cfg.total_steps if cfg.total_steps > 0 else estimate_total_steps(
        cfg, len(dataset), rows_per_sample(dataset, cfg.data))
    tx, schedule = optim_lib.make_optimizer(cfg.optim, total_steps)
    update_mask = state_lib.vit_layer_mask(trainable, cfg.freeze, has_vision)

    init_fn = jax.jit(lambda p: step_lib.init_state(p, tx, cfg.seed))
    state = init_fn(trainable)
    del trainable

    checkpointer = ckpt_lib.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                            every_steps=cfg.checkpoint.every_steps, keep=cfg.checkpoint.keep,
                                            async_save=cfg.checkpoint.async_save)
    start = checkpointer.latest_step()
    if start is not None:
        state, data_state, _ = checkpointer.restore(start, state)
        loader.set_state(data_state)
        print(f"resumed from {checkpointer.directory}/{start}", flush=True)
    start = int(start or 0)

    # explicit shardings: the state keeps the placement it was created with, rows split over
    # (data, fsdp); the state is donated, so params and optimizer state are updated in place
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    rows_sh = {k: NamedSharding(mesh, P(("data", "fsdp"))) for k in step_lib.ROW_KEYS}
    step_fn = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, grad_accum=cfg.grad_accum,
                                               chunk_size=cfg.loss_chunk_size, update_mask=update_mask,
                                               lora_dropout=use_lora and cfg.lora.dropout > 0),
                      in_shardings=(state_sh, frozen_sh, state_lib.replicated(mesh), rows_sh),
                      out_shardings=(state_sh, state_lib.replicated(mesh)),
                      donate_argnums=(0,))

    summary = startup_summary(cfg, model, state, frozen, dataset, mesh, total_steps, start)
    print(summary, flush=True)
    writer = metrics_lib.MetricsWriter(workdir)
    flops = flops_model(model, cfg)
    peak = metrics_lib.peak_flops_per_device(cfg.peak_flops_per_device)
    progress = metrics_lib.Progress(total_steps, start)

    pending = None  # (step, device metrics, host stats): fetched one step late, so the host never waits
    last = {}
    step = start
    stop_reason = None
    while step < total_steps:
        host = next(loader)
        host = rows_view(host, cfg.data.batch_size // jax.process_count())
        stats = {k: float(np.sum(host[k])) for k in ("num_samples", "num_real_tokens") if k in host}
        batch = to_global(host, mesh)
        state, m = step_fn(state, frozen, rest, batch)
        step += 1
        if pending is not None:
            last = finish_metrics(pending, writer, progress, flops, peak, cfg, total_steps)
            if last["train/nonfinite_streak"] >= cfg.max_nonfinite_steps:
                stop_reason = f"{int(last['train/nonfinite_streak'])} consecutive non-finite steps"
                break
        pending = (step, m, stats)
        if checkpointer.should_save(step):
            checkpointer.save(step, state, loader.get_state(), ckpt_lib.config_json(cfg))
    if pending is not None and stop_reason is None:
        last = finish_metrics(pending, writer, progress, flops, peak, cfg, total_steps)
        if last["train/nonfinite_streak"] >= cfg.max_nonfinite_steps:
            stop_reason = f"{int(last['train/nonfinite_streak'])} consecutive non-finite steps"
    if stop_reason:
        checkpointer.close()
        writer.close()
        raise RuntimeError(f"stopping: {stop_reason}; the last good checkpoint in "
                           f"{checkpointer.directory} is intact")
    if checkpointer.latest_step() != step:
        checkpointer.save(step, state, loader.get_state(), ckpt_lib.config_json(cfg), force=True)
    checkpointer.close()

    model = nnx.merge(graphdef, state.params, frozen, rest)
    result = {"step": step, "loss": last.get("train/loss")}
    if use_lora and jax.process_index() == 0:
        from mmjax.models.lora import merge_lora
        from mmjax.weights.peft_io import save_peft_adapter
        out = os.path.join(workdir, "hf_adapter")
        save_peft_adapter(model, out, base_model_name_or_path=cfg.model_path)
        result["adapter_dir"] = out
        print(f"exported the PEFT adapter to {out}", flush=True)
        merge_lora(model)   # W + (alpha / r) B A, in the source layout below
    if cfg.export.hf and jax.process_index() == 0:
        out = os.path.join(workdir, "hf")
        mmjax.save_pretrained(model, out, dtype=cfg.export.dtype)
        result["hf_dir"] = out
        print(f"exported HF weights to {out}", flush=True)
    if cfg.eval.enabled:
        from mmjax.train.evaluate import evaluate_vqa
        acc = evaluate_vqa(model, tokenizer, cfg)
        writer.write(step, {"eval/accuracy": acc})
        result["eval/accuracy"] = acc
        print(f"held-out accuracy: {100 * acc:.1f}%", flush=True)
    writer.close()
    return result


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


def startup_summary(cfg, model, state, frozen, dataset, mesh, total_steps, start) -> str:
    n_train = state_lib.count_params(state.params)
    n_frozen = state_lib.count_params(frozen)
    b_params = state_lib.state_bytes(state.params) + state_lib.state_bytes(frozen)
    b_opt = state_lib.state_bytes(state.opt_state)
    per_dev = (b_params + b_opt) / jax.device_count()
    lines = [
        f"mmjax train: {cfg.name}",
        f"  model      {cfg.model_path} ({type(model).__name__}), compute {cfg.model.dtype}, master {cfg.model.param_dtype}",
        f"  params     total {n_train + n_frozen:,} | trainable {n_train:,} | frozen {n_frozen:,}",
        f"  data       {len(dataset):,} samples, template {cfg.data.template}, pack {cfg.data.pack_max_length} tokens"
        f" / {cfg.data.max_tiles_per_pack} tiles per row",
        f"  batch      {cfg.data.batch_size} rows x {cfg.data.pack_max_length} tokens, grad_accum {cfg.grad_accum}",
        f"  mesh       {dict(mesh.shape)} on {jax.device_count()} x {jax.devices()[0].device_kind}",
        f"  memory     params {b_params / 2**30:.2f} GiB + optimizer {b_opt / 2**30:.2f} GiB "
        f"~ {per_dev / 2**30:.2f} GiB per device before activations",
        f"  steps      {start} -> {total_steps}, lr {cfg.optim.lr}, warmup {cfg.optim.warmup_ratio:.0%}, cosine",
    ]
    return "\n".join(lines)
