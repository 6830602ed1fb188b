"""Training speed on this machine: steps/s, tokens/s, first-step compile time and recompilations.

    python bench/train_speed.py            # tiny config + a ~100M-parameter InternVL, 100-step recompile check
    python bench/train_speed.py --quick    # fewer steps, smaller batches for the 100M model
    python bench/train_speed.py --models tiny --steps 10 --recompile_steps 50

Both models train through the pieces ``mmjax/train/run.py`` uses (the trainable/frozen split,
``param_shardings`` placement on a mesh, ``make_optimizer``, ``init_state``,
``make_train_step`` jitted with the donated state, and ``rows_view`` / ``to_global`` on real
loader batches of the embedded default's shapes data); only the loop is the benchmark's own so
that it can time each step and read the jitted step's compile cache. The ~100M model is the tiny
one with a wider ViT (256 x 4) and decoder (768 x 12), random weights, the tiny tokenizer's vocab.

Timing: every step is ``block_until_ready``-ed; "step" time excludes host data loading, which is
reported separately ("data ms"). "first step" is the wall time of the first call (trace + compile
+ run); "compile" is that minus the median step time.

Recompilations are counted two ways over ``--recompile_steps`` steps of varying data (the loader's
real batches: different samples, packing and tile counts every step, same padded shapes):
  * ``step_fn._cache_size()``: entries in the jitted step's dispatch cache, counted from after
    the second step (the first step's output state may differ in sharding / committedness from
    the initial state: that adds one dispatch entry but no XLA compilation, as the log shows);
  * jax's own compile log: with ``jax_log_compiles`` on, every XLA compilation logs
    "Finished XLA compilation of <name>"; a logging handler counts those naming the step function.
Both must be 0 after the first step.

Results: a table on stdout and ``bench/results/train_speed.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import sharding as shd
from mmjax.train import optim as optim_lib
from mmjax.train import run as run_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

BIG_VISION = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
BIG_LLM = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
               intermediate_size=2304)


class CompileCounter(logging.Handler):
    """Counts jax's "Finished XLA compilation of <fn>" log records for one function name."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)  # jax_log_compiles logs at WARNING
        self.name, self.count = name, 0

    def emit(self, record):
        msg = record.getMessage()
        if "Finished XLA compilation of" in msg and re.search(rf"\b{re.escape(self.name)}\b", msg):
            self.count += 1


def tiny_config():
    spec = importlib.util.spec_from_file_location("_tiny_config", ROOT / "configs" / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def build_model(cfg, tokenizer, big: bool):
    """The tiny model from its generated checkpoint, or the ~100M variant with random weights."""
    import mmjax
    from mmjax.train.tiny import upstream_config
    from mmjax.weights import layouts

    img_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if not big:
        return mmjax.from_pretrained(cfg.model_path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                     remat=cfg.model.remat, img_context_token_id=img_id)
    with cfg.unlocked():
        cfg.synthetic.vision.update(BIG_VISION)
        cfg.synthetic.llm.update(BIG_LLM)
    hf_config = upstream_config(cfg, len(tokenizer), cfg.data.template)
    make = layouts.model_factory("internvl_chat", hf_config, None, remat=cfg.model.remat,
                                 img_context_token_id=img_id)
    return make(jnp.float32, jnp.float32, nnx.Rngs(cfg.seed))


def bench_model(name: str, cfg, steps: int, recompile_steps: int, big: bool) -> dict:
    from mmjax.data import build_dataset, build_loader
    from mmjax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_path)
    model = build_model(cfg, tokenizer, big)
    mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    loader = build_loader(cfg.data, tokenizer, dataset=build_dataset(cfg.data, tokenizer))

    # the same split / placement / optimizer / step as run.train
    filt = state_lib.trainable_filter(cfg.freeze, True)
    graphdef, trainable, frozen, rest = nnx.split(model, filt, nnx.Param, ...)
    trainable = jax.device_put(trainable, state_lib.param_shardings(trainable, mesh))
    frozen = jax.device_put(frozen, state_lib.param_shardings(frozen, mesh))
    rest = jax.device_put(rest, state_lib.replicated(mesh))
    n_params = state_lib.count_params(trainable) + state_lib.count_params(frozen)
    total = 1 + steps + recompile_steps
    tx, schedule = optim_lib.make_optimizer(cfg.optim, total)
    state = jax.jit(lambda p: step_lib.init_state(p, tx, cfg.seed))(trainable)
    del trainable, model
    step_fn = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, grad_accum=cfg.grad_accum,
                                               chunk_size=cfg.loss_chunk_size,
                                               update_mask=None), donate_argnums=(0,))

    def next_batch():
        t = time.perf_counter()
        host = run_lib.rows_view(next(loader), cfg.data.batch_size)
        batch = run_lib.to_global(host, mesh, cfg.grad_accum)
        return batch, int(np.sum(host["segment_ids"] > 0)), time.perf_counter() - t

    counter = CompileCounter("step")
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(counter)
    jax_logger.propagate = False  # count the compile log lines without printing them
    jax.config.update("jax_log_compiles", True)
    try:
        batch, _, _ = next_batch()
        t0 = time.perf_counter()
        state, m = step_fn(state, frozen, rest, batch)
        jax.block_until_ready((state, m))
        first = time.perf_counter() - t0
        cache_after_first = step_fn._cache_size()
        logged_after_first = counter.count
        losses = [float(m["train/loss"])]

        step_times, data_times, tokens = [], [], []
        for i in range(steps + recompile_steps):
            batch, real, dt_data = next_batch()
            t0 = time.perf_counter()
            state, m = step_fn(state, frozen, rest, batch)
            jax.block_until_ready((state, m))
            dt = time.perf_counter() - t0
            losses.append(float(m["train/loss"]))
            if i == 0:
                # the state the first step returns can differ in dispatch signature (shardings /
                # committedness) from the freshly initialised one: one more C++ dispatch-cache
                # entry, no new XLA compilation. Count cache growth from here on.
                cache_after_second = step_fn._cache_size()
            if i < steps or not step_times:
                step_times.append(dt)
                data_times.append(dt_data)
                tokens.append(real)
            if (i + 1) % 25 == 0:
                print(f"  [{name}] {i + 1}/{steps + recompile_steps} steps", flush=True)
        recompiles_cache = step_fn._cache_size() - cache_after_second
        cache_entries = step_fn._cache_size()
        recompiles_logged = counter.count - logged_after_first
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(counter)
        jax_logger.propagate = True
        loader.close()

    med = statistics.median(step_times)
    tot = sum(step_times)
    return {
        "model": name,
        "params": n_params,
        "batch": f"{cfg.data.batch_size}x{cfg.data.pack_max_length}",
        "grad_accum": cfg.grad_accum,
        "timed_steps": len(step_times),
        "steps_per_s": len(step_times) / tot,
        "tokens_per_s": sum(tokens) / tot,
        "median_step_s": med,
        "data_ms_per_step": 1000 * statistics.mean(data_times),
        "first_step_s": first,
        "compile_s": max(first - med, 0.0),
        "compiles_first_step": logged_after_first,
        "recompile_check_steps": 1 + steps + recompile_steps,
        "recompiles_cache": recompiles_cache,
        "cache_entries": cache_entries,
        "cache_entries_after_first": cache_after_first,
        "recompiles_logged": recompiles_logged,
        "loss_first_last": [losses[0], losses[-1]],
        "finite": bool(np.all(np.isfinite(losses))),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="5 timed steps, 20-step recompile check, 100M model on 1 row x 256 tokens and 2 steps")
    p.add_argument("--models", default="tiny,100m", help="comma list of tiny, 100m")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5)")
    p.add_argument("--recompile_steps", type=int, default=None,
                   help="extra tiny-config steps of varying data for the recompile count (default 100; 20 quick)")
    p.add_argument("--big_batch", type=int, default=None, help="rows per step for the 100M model (default 2; 1 quick)")
    p.add_argument("--big_pack", type=int, default=None, help="tokens per row for the 100M model (default 512; 256 quick)")
    p.add_argument("--workdir", default=str(RESULTS / "_work"), help="where the tiny assets are generated")
    args = p.parse_args(argv)

    steps = args.steps or 5
    recompile_steps = args.recompile_steps if args.recompile_steps is not None else (20 if args.quick else 100)
    big_steps = 2 if args.quick and args.steps is None else steps
    big_batch = args.big_batch or (1 if args.quick else 2)
    big_pack = args.big_pack or (256 if args.quick else 512)

    base = tiny_config()
    if args.quick:
        with base.unlocked():
            base.synthetic.num_train = 300
            base.synthetic.num_eval = 10
    os.makedirs(args.workdir, exist_ok=True)
    t = time.perf_counter()
    run_lib.prepare_synthetic(base, args.workdir)
    print(f"assets ready in {time.perf_counter() - t:.1f}s under {args.workdir}", flush=True)

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        cfg = tiny_config()
        with cfg.unlocked():
            cfg.synthetic.num_train, cfg.synthetic.num_eval = base.synthetic.num_train, base.synthetic.num_eval
            cfg.model_path, cfg.data.meta_path = base.model_path, base.data.meta_path
            if name == "100m":
                cfg.data.batch_size = big_batch
                cfg.data.pack_max_length = big_pack
                cfg.data.max_tiles_per_pack = max(4, big_pack // 16)
        run_lib.validate_config(cfg)
        print(f"benchmarking {name} ...", flush=True)
        if name == "tiny":
            rows.append(bench_model(name, cfg, steps, recompile_steps, big=False))
        elif name == "100m":
            rows.append(bench_model(name, cfg, big_steps, 0, big=True))
        else:
            raise SystemExit(f"unknown model {name!r}")

    cols = [("model", "{}"), ("params", "{:,}"), ("batch", "{}"), ("steps_per_s", "{:.3f}"),
            ("tokens_per_s", "{:,.0f}"), ("median_step_s", "{:.3f}"), ("data_ms_per_step", "{:.1f}"),
            ("first_step_s", "{:.1f}"), ("compile_s", "{:.1f}"), ("recompile_check_steps", "{}"),
            ("recompiles_cache", "{}"), ("recompiles_logged", "{}")]
    cells = [[f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, (c, _) in enumerate(cols)]
    print()
    print(" | ".join(c.ljust(w) for (c, _), w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for x in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(x, widths)))

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"bench": "train_speed", "quick": args.quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "platform": platform.platform(), "results": rows}
    path = RESULTS / "train_speed.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    bad = [r["model"] for r in rows if r["recompiles_cache"] or r["recompiles_logged"]]
    if bad:
        print(f"RECOMPILATIONS after the first step: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
