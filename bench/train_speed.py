"""Training speed on this machine: steps/s, tokens/s, first-step compile time and recompilations.

    python bench/train_speed.py            # tiny config + a ~100M-parameter InternVL, 100-step recompile check
    python bench/train_speed.py --quick    # fewer steps, smaller batches for the 100M model
    python bench/train_speed.py --models tiny --steps 10 --recompile_steps 50

Both models train through ``mmjax.train.setup.build_run``, the builder ``python -m mmjax.train``
uses (the configured attention backend and remat, the trainable / frozen split with the frozen
storage dtype, shardings, optimizer, update mask, and the step jitted with explicit in/out
shardings and the donated state), on real loader batches of the embedded default's shapes data;
only the loop is the benchmark's own so that it can time each step and read the jitted step's
compile cache. The ~100M model is the tiny one with a wider ViT (256 x 4) and decoder (768 x 12),
random weights (``build_run(hf_config=...)``), the tiny tokenizer's vocab.

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
import numpy as np

from mmjax.data.embedded import prepare_embedded, upstream_config
from mmjax.train.setup import build_run

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


def bench_model(name: str, cfg, workdir: str, steps: int, recompile_steps: int, big: bool) -> dict:
    hf_config = None
    if big:   # the tiny InternVL, wider: random weights, the embedded tokenizer's vocabulary
        prepare_embedded(cfg, workdir)   # the tiny assets (tokenizer, data); the model below is built from a dict
        with cfg.unlocked():
            cfg.synthetic.vision.update(BIG_VISION)
            cfg.synthetic.llm.update(BIG_LLM)
        from mmjax.data.tokenizer import load_tokenizer
        hf_config = upstream_config(cfg, len(load_tokenizer(cfg.model_path)), cfg.data.template)
    run = build_run(cfg, workdir=workdir, hf_config=hf_config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((run.state.params, run.frozen)))
    state, step_fn, loader = run.state, run.step_fn, run.loader

    def next_batch():
        t = time.perf_counter()
        host = next(loader)
        batch = run.to_global(host)
        return batch, int(np.sum(host["segment_ids"] > 0)), time.perf_counter() - t

    counter = CompileCounter("step")
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(counter)
    jax_logger.propagate = False  # count the compile log lines without printing them
    jax.config.update("jax_log_compiles", True)
    try:
        batch, _, _ = next_batch()
        t0 = time.perf_counter()
        state, m = step_fn(state, run.frozen, run.rest, batch)
        jax.block_until_ready((state, m))
        first = time.perf_counter() - t0
        cache_after_first = step_fn._cache_size()
        logged_after_first = counter.count
        losses = [float(m["train/loss"])]

        step_times, data_times, tokens = [], [], []
        for i in range(steps + recompile_steps):
            batch, real, dt_data = next_batch()
            t0 = time.perf_counter()
            state, m = step_fn(state, run.frozen, run.rest, batch)
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
        "attention": cfg.model.attention,
        "remat": cfg.model.remat,
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

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("tiny", "100m"):
            raise SystemExit(f"unknown model {name!r}")
        cfg = tiny_config()
        with cfg.unlocked():
            cfg.total_steps = 1 + steps + recompile_steps
            if args.quick:
                cfg.synthetic.num_train, cfg.synthetic.num_eval = 300, 10
            if name == "100m":
                cfg.total_steps = 1 + big_steps
                cfg.data.batch_size = big_batch
                cfg.data.pack_max_length = big_pack
                cfg.data.max_tiles_per_pack = max(4, big_pack // 16)
        print(f"benchmarking {name} ...", flush=True)
        if name == "tiny":
            rows.append(bench_model(name, cfg, args.workdir, steps, recompile_steps, big=False))
        else:
            rows.append(bench_model(name, cfg, args.workdir, big_steps, 0, big=True))

    cols = [("model", "{}"), ("params", "{:,}"), ("attention", "{}"), ("batch", "{}"), ("steps_per_s", "{:.3f}"),
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
