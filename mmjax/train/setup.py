"""Assembling a training run: the one place where a config becomes a model, data, a mesh, a train
state and a jitted step. The trainer (``run.train``), the benchmarks, the tests and the memory
planner all call :func:`build_run`, so what they measure is what trains.

    run = build_run(cfg, workdir=...)                    # weights read, data loader built
    run = build_run(cfg, abstract=True)                  # shapes only: nothing read, nothing allocated
    state, metrics = run.step_fn(run.state, run.frozen, run.rest, run.to_global(next(run.loader)))

``abstract=True`` builds every parameter, optimizer state and batch as a ``jax.ShapeDtypeStruct``
carrying its sharding: ``run.lower()`` then compiles the real step ahead of time. ``hf_config``
gives the model's config.json as a dict instead of reading ``cfg.model_path`` (random weights when
not abstract): how a benchmark builds a model no checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax import sharding as shd
from mmjax.data.batch import batch_shapes, row_keys
from mmjax.data.config import known_templates
from mmjax.data.xcomposer import TEMPLATE as XCOMPOSER_TEMPLATE
from mmjax.dtypes import model_dtype
from mmjax.errors import UserError
from mmjax.models.options import ModelOptions
from mmjax.train import optim as optim_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib


class ConfigError(UserError, ValueError):
    """A config that cannot run (one-line message naming the key)."""


def model_options(cfg, img_context_token_id: int | None = None) -> ModelOptions:
    """``config.model``'s run-time knobs as the typed :class:`ModelOptions` (validated here, once)."""
    m = cfg.model
    try:
        return ModelOptions(remat=m.remat, attention=m.attention, attention_block=int(m.attention_block),
                            token_chunk=int(m.token_chunk),
                            vit_attention=m.vit_attention, vit_attention_block=int(m.vit_attention_block),
                            vit_tile_chunk=int(m.vit_tile_chunk),
                            drop_path_rate=float(m.drop_path_rate), plora_dropout=float(m.plora_dropout),
                            img_context_token_id=img_context_token_id)
    except ValueError as e:
        raise ConfigError(f"config.model.{e}") from None


TOTAL_STEPS_UNSET = -1   # config.total_steps's default: the full schedule (num_epochs over the data)


def validate_config(cfg, checkpoint_required: bool = True, devices=None) -> dict:
    """Impossible combinations and missing files fail here, before anything is generated or compiled.
    ``checkpoint_required=False``: the model's config comes from elsewhere (``build_run(hf_config=)``).
    ``devices``: what the mesh is laid over (default: every visible device). Returns the sharding
    rule table (``config.mesh.rules`` applied)."""
    if cfg.total_steps != TOTAL_STEPS_UNSET and cfg.total_steps <= 0:
        raise ConfigError(f"config.total_steps={cfg.total_steps}: must be > 0 (leave it at {TOTAL_STEPS_UNSET} "
                          f"for the full schedule, num_epochs over the data)")
    if cfg.data.batch_size <= 0 or cfg.grad_accum <= 0 or cfg.data.batch_size % cfg.grad_accum:
        raise ConfigError(f"config.batch_size={cfg.data.batch_size} must be a positive multiple of "
                          f"config.grad_accum={cfg.grad_accum}")
    n_dev = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    visible = jax.device_count() if devices is None else len(devices)
    if n_dev != visible:
        raise ConfigError(f"config.mesh data={cfg.mesh.data} x fsdp={cfg.mesh.fsdp} x tensor={cfg.mesh.tensor} "
                          f"= {n_dev} devices, but {visible} are {'visible' if devices is None else 'given'}")
    try:
        rules = shd.rules_from_config(cfg.mesh.get("rules"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    micro = cfg.data.batch_size // cfg.grad_accum
    rows_axes = cfg.mesh.data * cfg.mesh.fsdp
    if micro % rows_axes:
        raise ConfigError(f"micro-batch of {micro} rows (batch_size / grad_accum) does not divide over "
                          f"data x fsdp = {rows_axes} devices")
    model_options(cfg)
    if cfg.optim.get("schedule", "cosine") not in optim_lib.SCHEDULES:
        raise ConfigError(f"config.optim.schedule={cfg.optim.schedule!r}: choose one of {optim_lib.SCHEDULES}")
    for key in ("dtype", "param_dtype", "frozen_param_dtype"):
        try:
            model_dtype(cfg.model[key], f"config.model.{key}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.export.hf:   # found now, not after training
        from mmjax.weights.saver import export_dtype
        try:
            export_dtype(cfg.export.dtype)
        except ValueError as e:
            raise ConfigError(f"config.export.dtype: {e}") from None
    template = cfg.data.get("template", "")
    if template and template not in known_templates():
        raise ConfigError(f"config.data.template={template!r}: unknown; choose from {known_templates()} (or '' for "
                          "the checkpoint's own)")
    if cfg.freeze.backbone and cfg.freeze.mlp and cfg.freeze.llm and not (cfg.lora.llm_rank or cfg.lora.vit_rank) \
            and not cfg.freeze.unfreeze_vit_layers:
        raise ConfigError("every parameter is frozen (freeze.backbone, freeze.mlp, freeze.llm) and no LoRA rank "
                          "is set: nothing would train")
    if not cfg.synthetic.enabled and checkpoint_required:
        if not cfg.model_path:
            raise ConfigError("config.model_path is empty: point it at an HF checkpoint directory")
        if not os.path.isdir(cfg.model_path):
            name = os.path.basename(os.path.normpath(cfg.model_path))
            raise ConfigError(f"config.model_path {cfg.model_path} does not exist; download it with "
                              f"`huggingface-cli download OpenGVLab/{name} --local-dir {cfg.model_path}`")
        from mmjax.weights.loader import check_directory
        check_directory(cfg.model_path)   # config.json and the safetensors present, before anything runs
    if cfg.eval.enabled and not cfg.synthetic.enabled and not cfg.eval.annotation:
        raise ConfigError("config.eval.enabled is set but config.eval.annotation is empty: name a held-out "
                          "InternVL JSONL (and eval.root for its images)")
    return rules


@dataclasses.dataclass
class Run:
    """Everything a training loop needs, built once. With ``abstract=True`` the arrays are
    ``jax.ShapeDtypeStruct``s (with shardings) and there is no tokenizer-bound data loader."""

    cfg: Any                     # the validated config, paths and template resolved
    mesh: Mesh
    rules: dict                  # logical axis -> mesh axes (mmjax.sharding), config.mesh.rules applied
    notes: list[str]             # start-up decisions worth a line in the summary
    tokenizer: Any
    model_type: str              # the model's class name
    has_vision: bool
    use_lora: bool
    graphdef: Any
    state: state_lib.TrainState  # trainable params (master dtype) + optimizer state
    frozen: Any                  # frozen params (storage dtype config.model.frozen_param_dtype)
    rest: Any                    # non-parameter variables (RNG state, the SourceRecord rides in graphdef)
    state_shardings: Any
    frozen_shardings: Any
    rest_shardings: Any
    batch_shardings: dict
    tx: Any
    schedule: Any
    update_mask: Any
    total_steps: int
    step_fn: Any                 # jax.jit(step) with explicit in/out shardings, state donated
    dataset: Any = None
    loader: Any = None
    abstract: bool = False
    image_tokens: bool = False   # batches carry XComposer2's image_token / image_tile (mmjax.data.batch)
    vocab_size: int = 0          # embedding rows: every token id of a batch must be below it

    def check_token_ids(self, host_batch: dict) -> None:
        """A batch holding an id past the embedding (an added tokenizer token the model lacks) is an
        error naming the id: the gather would read no weights. A host max over the ids, before the step."""
        top = int(np.max(host_batch["input_ids"])) if np.size(host_batch["input_ids"]) else -1
        if self.vocab_size and top >= self.vocab_size:
            name = self.tokenizer.convert_ids_to_tokens(top) if self.tokenizer is not None else "?"
            raise ConfigError(f"a batch holds token id {top} ({name!r}), but the embedding of {self.cfg.model_path} "
                              f"has {self.vocab_size} rows: the tokenizer holds tokens the model does not")

    # ---- batches ----------------------------------------------------------------------------

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes, as sharded ``ShapeDtypeStruct``s."""
        d = self.cfg.data
        shapes = batch_shapes(int(d.batch_size), int(d.pack_max_length if d.packing != "none" else d.max_length),
                              int(d.max_tiles_per_pack), int(d.image_size), image_tokens=self.image_tokens)
        return {k: jax.ShapeDtypeStruct(s, dt, sharding=self.batch_shardings[k]) for k, (s, dt) in shapes.items()}

    def to_global(self, host_batch: dict) -> dict:
        """This process's rows (a loader batch) -> global arrays, rows split over (data, fsdp)."""
        return {k: jax.make_array_from_process_local_data(self.batch_shardings[k], np.asarray(host_batch[k]))
                for k in row_keys(self.image_tokens)}

    # ---- the step -----------------------------------------------------------------------------

    def lower(self):
        """The step lowered on abstract inputs (ahead of time; nothing runs)."""
        spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                                         if hasattr(x, "sharding") else x, tree)
        return self.step_fn.lower(spec(self.state), spec(self.frozen), spec(self.rest), self.batch_spec())

    def model(self, params=None):
        """The model with ``params`` (default: the state's) merged back with the frozen part."""
        return nnx.merge(self.graphdef, self.state.params if params is None else params, self.frozen, self.rest)


def build_run(cfg, devices=None, *, abstract: bool = False, workdir: str | None = None,
              hf_config: dict | None = None, with_data: bool = True) -> Run:
    """Assemble a run from ``cfg`` (see the module docstring) on ``config.mesh`` laid over
    ``devices`` (default: every visible device). ``workdir`` holds what the embedded default
    generates; ``with_data=False`` skips the dataset and loader (``total_steps`` must then come
    from the config)."""
    rules = validate_config(cfg, checkpoint_required=hf_config is None, devices=devices)
    notes = []
    if cfg.synthetic.enabled:
        if workdir is None:
            raise ConfigError("the embedded default (synthetic.enabled) generates its assets in a workdir: pass one")
        notes += _embedded_assets(cfg, workdir)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    with shd.use_rules(rules, mesh):
        return _assemble(cfg, mesh, rules, notes, abstract=abstract, hf_config=hf_config, with_data=with_data)


def _assemble(cfg, mesh: Mesh, rules: dict, notes: list, *, abstract: bool, hf_config, with_data: bool) -> Run:
    from mmjax.models.lora import partial_lora_dropout_modules

    layout, config = _model_config(cfg, hf_config)   # config.json first: a tokenizer load reads it too
    tokenizer = _load_tokenizer(cfg, required=with_data and not abstract)
    options = model_options(cfg, _image_token_id(cfg, layout, tokenizer))
    model = _build_model(cfg, layout, config, options, abstract=abstract, from_checkpoint=hf_config is None,
                         mesh=mesh)
    has_vision = hasattr(model, "vision_model")
    use_lora = bool(cfg.lora.llm_rank or cfg.lora.vit_rank)
    vocab_size = int(step_lib.language_model(model).cfg.vocab_size)
    if tokenizer is not None and int(tokenizer.vocab_size) > vocab_size:
        raise ConfigError(f"{_config_name(cfg, hf_config)}: the embedding has {vocab_size} rows, but the tokenizer "
                          f"({cfg.tokenizer_path or cfg.model_path}) has {tokenizer.vocab_size} base ids: its ids past "
                          "the embedding would read no weights (a tokenizer of another model?)")

    from mmjax.data.templates import resolve_template
    image_tokens = layout == "xcomposer2"
    if image_tokens:
        notes += _xcomposer_data(cfg, model)
    elif cfg.data.template == XCOMPOSER_TEMPLATE:
        raise ConfigError(f"data.template='{XCOMPOSER_TEMPLATE}' is InternLM-XComposer2's; {_config_name(cfg, hf_config)} is a "
                          f"{layout} checkpoint")
    else:
        try:
            notes.append(resolve_template(cfg.data, config, where=_config_name(cfg, hf_config)))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    dataset = loader = None
    if with_data and not abstract:
        from mmjax.data import build_dataset, build_loader
        dataset = build_dataset(cfg.data, tokenizer)
        loader = build_loader(cfg.data, tokenizer, dataset=dataset)
    if cfg.total_steps > 0:
        total_steps = int(cfg.total_steps)
    elif dataset is not None:
        total_steps = estimate_total_steps(cfg, len(dataset), rows_per_sample(dataset, cfg.data))
    else:
        raise ConfigError("config.total_steps must be > 0 when the run has no data to count steps from")

    # params: trainable (float32 master weights, optimizer state) vs frozen (storage dtype) vs the rest
    freeze = state_lib.effective_freeze(cfg)
    graphdef, trainable, frozen, rest = nnx.split(model, state_lib.trainable_filter(freeze, has_vision), nnx.Param, ...)
    frozen = _cast_floating(frozen, model_dtype(cfg.model.frozen_param_dtype))
    tx, schedule = optim_lib.make_optimizer(cfg.optim, total_steps)
    update_mask = state_lib.vit_layer_mask(trainable, freeze, has_vision,
                                           model.vision_layers_read() if has_vision else None)

    if mesh.size > 1:
        try:
            notes += shd.check_replication(state_lib.param_leaves(trainable) + state_lib.param_leaves(frozen), mesh)
        except shd.ShardingError as e:
            raise ConfigError(str(e)) from None
    repl = state_lib.replicated(mesh)
    trainable_sh = state_lib.param_shardings(trainable, mesh)
    frozen_sh = state_lib.param_shardings(frozen, mesh)
    rest_sh = repl
    init = lambda p: step_lib.init_state(p, tx, cfg.seed)
    abstract_state = jax.eval_shape(init, trainable)
    state_sh = state_lib.param_shardings(abstract_state, mesh)
    if abstract:
        state = jax.tree.map(_with_sharding, abstract_state, state_sh)
        frozen = jax.tree.map(_with_sharding, frozen, frozen_sh)
    else:
        trainable = jax.device_put(trainable, trainable_sh)
        state = jax.jit(init, in_shardings=(trainable_sh,), out_shardings=state_sh)(trainable)
        del trainable
        frozen = jax.device_put(frozen, frozen_sh)
        rest = jax.device_put(rest, rest_sh)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    batch_sh = {k: rows for k in row_keys(image_tokens)}
    step = step_lib.make_train_step(graphdef, tx, schedule, grad_accum=cfg.grad_accum, chunk_size=cfg.loss_chunk_size,
                                    update_mask=update_mask, lora_dropout=(use_lora and cfg.lora.dropout > 0)
                                    or bool(partial_lora_dropout_modules(model)))
    step = shd.traced_with(step, rules, mesh)   # its activations' constraints are made when it traces
    # explicit shardings: the state keeps its placement; it is donated, so params and optimizer
    # state are updated in place
    step_fn = jax.jit(step, in_shardings=(state_sh, frozen_sh, rest_sh, batch_sh), out_shardings=(state_sh, repl),
                      donate_argnums=(0,))
    return Run(cfg=cfg, mesh=mesh, rules=rules, notes=notes, tokenizer=tokenizer, model_type=type(model).__name__,
               has_vision=has_vision, use_lora=use_lora, graphdef=graphdef, state=state, frozen=frozen, rest=rest,
               state_shardings=state_sh, frozen_shardings=frozen_sh, rest_shardings=rest_sh, batch_shardings=batch_sh,
               tx=tx, schedule=schedule, update_mask=update_mask, total_steps=total_steps, step_fn=step_fn,
               dataset=dataset, loader=loader, abstract=abstract, image_tokens=image_tokens, vocab_size=vocab_size)


# ---- pieces ---------------------------------------------------------------------------------------


EMBEDDED_WAIT_S = 900   # how long the other processes of a run wait for process 0's generated assets


def _embedded_assets(cfg, workdir: str) -> list[str]:
    """The embedded default's assets: generated by process 0 only (on several processes the
    workdir is shared and two writers race on the same files); the others wait for its marker,
    then find every asset present (generation is stamped: nothing is written twice)."""
    import time
    from mmjax.data.embedded import prepare_embedded
    if jax.process_count() == 1:
        return prepare_embedded(cfg, workdir)
    marker = os.path.join(workdir, "assets", f".generated-by-process-0-{_run_token()}")
    if jax.process_index() == 0:
        notes = prepare_embedded(cfg, workdir)
        with open(marker, "w") as f:
            f.write("done\n")
        return notes
    deadline = time.monotonic() + EMBEDDED_WAIT_S
    while not os.path.exists(marker):
        if time.monotonic() > deadline:
            raise ConfigError(f"process {jax.process_index()}: process 0 did not finish generating the embedded "
                              f"assets in {workdir}/assets within {EMBEDDED_WAIT_S} s (is the workdir on a file "
                              "system every process sees?)")
        time.sleep(0.5)
    return prepare_embedded(cfg, workdir)


def _run_token() -> str:
    """The same string on every process of this run, different for the next run: process 0's clock
    (seconds) shared through a one-element all-gather."""
    import time
    from jax.experimental import multihost_utils
    stamp = np.asarray([int(time.time()) % 2 ** 31 if jax.process_index() == 0 else 0], np.int32)
    return str(int(np.max(multihost_utils.process_allgather(stamp))))


def _load_tokenizer(cfg, required: bool):
    from mmjax.data.tokenizer import TOKENIZER_FILES, load_tokenizer
    path = cfg.tokenizer_path or cfg.model_path
    if not required and not (path and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)):
        return None   # a run without data needs no tokenizer (the <IMG_CONTEXT> id then comes from the config)
    return load_tokenizer(path)


def _xcomposer_data(cfg, model) -> list[str]:
    """The data settings an XComposer2 checkpoint fixes: its template, its tile size, and the
    tokens per tile (derived); a contradicting explicit setting is an error."""
    mc, d = model.cfg, cfg.data
    if cfg.eval.enabled:
        raise ConfigError("config.eval (held-out VQA after training) asks InternVL prompts; it does not support "
                          "XComposer2 checkpoints yet: set --config.eval.enabled=False")
    if d.template != XCOMPOSER_TEMPLATE:
        raise ConfigError(f"an InternLM-XComposer2 checkpoint needs data.template='{XCOMPOSER_TEMPLATE}', "
                          f"got {d.template!r}")
    if int(d.image_size) != mc.img_size:
        what = "crop size of its HD grid" if mc.hd else "image size"
        raise ConfigError(f"data.image_size={d.image_size}, but the checkpoint's {what} is {mc.img_size}")
    if mc.hd != (int(d.hd_num) > 0):
        raise ConfigError(f"data.hd_num={d.hd_num}: this checkpoint {'is' if mc.hd else 'is not'} an HD variant "
                          f"({'set hd_num > 0' if mc.hd else 'set hd_num = -1'})")
    if int(d.num_image_token) != mc.tokens_per_tile:
        raise ConfigError(f"data.num_image_token={d.num_image_token}, but a {mc.img_size}-px tile of this checkpoint "
                          f"gives {mc.tokens_per_tile} tokens")
    return [f"template: {XCOMPOSER_TEMPLATE} (InternLM-XComposer2), {mc.tokens_per_tile} tokens a {mc.img_size}-px tile"
            + (f", HD grid of <= {d.hd_num} crops ({d.hd_variant})" if mc.hd else "")]


def _image_token_id(cfg, layout: str, tokenizer) -> int | None:
    """The ``<IMG_CONTEXT>`` id the model looks for: the tokenizer's (the id the data pipeline
    writes), or ``config.model.img_context_token_id`` where there is no tokenizer (abstract plans)."""
    given = int(cfg.model.get("img_context_token_id", -1))
    if layout in ("causal_lm", "xcomposer2"):   # XComposer2 places its image tokens by position
        return None
    if tokenizer is None:
        return given if given >= 0 else None
    tok = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if given >= 0 and given != tok:
        raise ConfigError(f"config.model.img_context_token_id={given} but the tokenizer's <IMG_CONTEXT> is {tok}: "
                          "the model would look for another id than the data holds")
    return tok


def _config_name(cfg, hf_config) -> str:
    return "the given model config" if hf_config is not None else os.path.join(cfg.model_path, "config.json")


def _model_config(cfg, hf_config: dict | None) -> tuple[str, dict]:
    from mmjax.weights import layouts
    from mmjax.weights.loader import read_config
    config = dict(hf_config) if hf_config is not None else read_config(cfg.model_path)[0]
    return layouts.detect_layout(config), config


def _build_model(cfg, layout: str, config: dict, options: ModelOptions, *, abstract: bool, from_checkpoint: bool,
                 mesh: Mesh):
    """The model (weights read from ``cfg.model_path`` when ``from_checkpoint``, each straight into
    its sharding on ``mesh``; random otherwise; shapes only when ``abstract``), with the config's
    LoRA adapters."""
    import mmjax
    from mmjax.weights import layouts

    dtype, param_dtype = model_dtype(cfg.model.dtype), model_dtype(cfg.model.param_dtype)
    directory = cfg.model_path if from_checkpoint else None

    def with_lora(model):
        if cfg.lora.llm_rank or cfg.lora.vit_rank:
            from mmjax.models.lora import apply_lora
            apply_lora(model, llm_rank=cfg.lora.llm_rank,
                       vit_rank=cfg.lora.vit_rank if hasattr(model, "vision_model") else 0,
                       alpha_ratio=cfg.lora.alpha_ratio, dropout=cfg.lora.dropout,
                       llm_targets=tuple(cfg.lora.llm_targets) or None, vit_targets=tuple(cfg.lora.vit_targets),
                       rngs=cfg.seed)
        return model

    make = layouts.model_factory(layout, config, directory, options)
    if abstract:
        return layouts.abstract_model(lambda: with_lora(make(dtype, param_dtype, nnx.Rngs(cfg.seed))))
    if from_checkpoint:
        model = mmjax.from_pretrained(cfg.model_path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                      options=options, mesh=mesh)
    else:
        model = make(dtype, param_dtype, nnx.Rngs(cfg.seed))
    return with_lora(model)


def _cast_floating(tree, dtype):
    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)
    return jax.tree.map(cast, tree)


def _with_sharding(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def rows_per_sample(dataset, data_cfg, probe: int = 64, fill: float = 0.95) -> float:
    """Packed rows one sample occupies on average, from a seeded probe of the dataset: the
    tighter of the token and tile budgets, at the packer's typical fill. (Packing makes the
    number of steps per epoch data-dependent; upstream's packed mode asks the user for max_steps.)"""
    if data_cfg.get("packing", "first_fit") == "none":
        return 1.0
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
    seen = max(seen, 1)
    by_tokens = tokens / seen / (data_cfg.pack_max_length * fill)
    by_tiles = tiles / seen / (data_cfg.max_tiles_per_pack * fill)
    return max(by_tokens, by_tiles)


def estimate_total_steps(cfg, dataset_len: int, rows_each: float) -> int:
    return max(math.ceil(cfg.num_epochs * dataset_len * rows_each / cfg.data.batch_size), 1)
