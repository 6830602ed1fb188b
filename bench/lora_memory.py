"""Per-device memory of a LoRA train step on the real Mini-InternVL-Chat-2B/4B-V1-5 shapes,
from XLA's buffer assignment of the AOT-compiled step (nothing is allocated: every parameter,
optimizer state and batch is a ``jax.ShapeDtypeStruct``).

    python bench/lora_memory.py                      # both models, both batch layouts
    python bench/lora_memory.py --quick              # 1 row x 4096 tokens, 13 tiles (one upstream sample)
    python bench/lora_memory.py --models mini2b --layouts packed

What is compiled is what ``python -m mmjax.train`` runs for ``configs/mini{2b,4b}_lora.py``:
``mmjax.train.setup.build_run(cfg, abstract=True, hf_config=...)`` with the model's upstream
``internvl_chat`` config.json as a dict (written below from the reference numbers): compute
``config.model.dtype`` (bfloat16), master ``param_dtype`` (float32), ``remat`` ('full'), the
config's attention backend, LoRA from its ``lora`` block (rank 16, alpha 32, dropout 0.05, the
family's upstream LLM targets), the trainable / frozen split with frozen params in
``frozen_param_dtype`` (bfloat16), the optimizer, the update mask and the step (grad_accum,
loss_chunk_size, LoRA dropout on) jitted with explicit shardings and the donated state, then
``run.lower().compile()``. Abstract means every array is a ``ShapeDtypeStruct``; one device.

Batch mapping (upstream ``..._lora.sh``: per-device batch 4 samples of <= 4096 tokens, at most
12 tiles + thumbnail = 13 tiles of 448 each, grad accumulation 2): one micro-batch holds the
upstream per-device batch, either
  * ``packed``: 1 row of 16384 tokens with 52 tile slots (4 x 13), or
  * ``rows``:   4 rows of 4096 tokens with 13 tile slots each;
and the step scans ``--grad_accum`` (default 2, upstream's GRADIENT_ACC) such micro-batches,
so the step's batch has grad_accum x the micro-batch's rows.

Peak estimate = argument + output - alias + temp bytes of ``compiled.memory_analysis()``.
This is the CPU backend's buffer plan: GPU XLA fuses, schedules and rematerializes differently
(and the GPU attention kernels differ), so read it as an estimate of the step's buffers, not a
measured GPU peak. Results: a table on stdout and ``bench/results/lora_memory.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import sibling_config
from mmjax.models.catalog import CHECKPOINTS
from mmjax.models.lora import lora_param_count
from mmjax.train import state as state_lib
from mmjax.train.setup import build_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GiB = 2 ** 30

# the upstream internvl_chat config.json dicts (reference section 1.9) live in mmjax.models.catalog
_MINI2B, _MINI2B_IMG = CHECKPOINTS["Mini-InternVL-Chat-2B-V1-5"]
_MINI4B, _MINI4B_IMG = CHECKPOINTS["Mini-InternVL-Chat-4B-V1-5"]

MODELS = {
    "mini2b": dict(name="Mini-InternVL-Chat-2B-V1-5", config=_MINI2B,
                   train_config="mini2b_lora",
                   img_context_token_id=_MINI2B_IMG,     # 92544 <img>, 92545 </img>, 92546 <IMG_CONTEXT>
                   expected_trainable=15_728_640,        # reference 3.4 [computed]
                   upstream="2 GPUs (LoRA script, per-device 4); GB: none in ref "
                            "(full FT ~30 GB/GPU @ per-device 1)"),
    "mini4b": dict(name="Mini-InternVL-Chat-4B-V1-5", config=_MINI4B,
                   train_config="mini4b_lora",
                   img_context_token_id=_MINI4B_IMG,     # same rule: 32011 <img>, 32012 </img>, 32013 (computed)
                   expected_trainable=25_165_824,
                   upstream="2 GPUs (LoRA script, per-device 4); GB: none in ref "
                            "(full FT ~40 GB/GPU @ per-device 1)"),
}

TILE = 448
TOKENS_PER_TILE = (TILE // 14) ** 2 // 4   # 1024 patches, pixel shuffle 0.5 -> 256 tokens
UPSTREAM_SAMPLES, UPSTREAM_MAX_LEN, UPSTREAM_TILES = 4, 4096, 13

# name -> (rows per micro-batch, tokens per row, tile slots per row)
LAYOUTS = {
    "packed": (1, UPSTREAM_SAMPLES * UPSTREAM_MAX_LEN, UPSTREAM_SAMPLES * UPSTREAM_TILES),
    "rows": (UPSTREAM_SAMPLES, UPSTREAM_MAX_LEN, UPSTREAM_TILES),
}
QUICK_LAYOUTS = {"quick": (1, UPSTREAM_MAX_LEN, UPSTREAM_TILES)}   # one upstream sample


def load_train_config(name: str):
    return sibling_config(str(ROOT / "configs" / "base.py"), name)


def tree_bytes(tree) -> int:
    return int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def build(key: str, layout: tuple[int, int, int], grad_accum: int):
    """(abstract run, info) for a model and a batch layout: the step's batch is ``grad_accum``
    micro-batches of the layout's rows."""
    spec = MODELS[key]
    rows, tokens, tiles = layout
    cfg = load_train_config(spec["train_config"])
    with cfg.unlocked():
        cfg.model.img_context_token_id = spec["img_context_token_id"]   # no tokenizer here
        cfg.total_steps = 1000
        cfg.grad_accum = grad_accum
        cfg.data.batch_size = rows * grad_accum
        cfg.data.pack_max_length = tokens
        cfg.data.max_tiles_per_pack = tiles
        cfg.data.image_size = TILE
    run = build_run(cfg, abstract=True, hf_config=spec["config"], with_data=False)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((run.state, run.frozen))), "not abstract"
    model = run.model()
    trainable, frozen, state = run.state.params, run.frozen, run.state
    n_train = state_lib.count_params(trainable)
    n_lora = lora_param_count(model)
    float_opt = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    moments = int(sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in float_opt))
    info = dict(
        model=spec["name"], train_config=spec["train_config"], compute_dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype, frozen_param_dtype=cfg.model.frozen_param_dtype, remat=cfg.model.remat,
        attention=cfg.model.attention,
        lora_rank=cfg.lora.llm_rank, lora_alpha=cfg.lora.alpha_ratio * cfg.lora.llm_rank, lora_dropout=cfg.lora.dropout,
        loss_chunk_size=cfg.loss_chunk_size,
        trainable_params=n_train, lora_params=n_lora, expected_trainable=spec["expected_trainable"],
        frozen_params=state_lib.count_params(frozen), frozen_bytes=tree_bytes(frozen),
        trainable_bytes=tree_bytes(trainable), opt_state_bytes=tree_bytes(state.opt_state),
        opt_moment_bytes=moments, rest_bytes=tree_bytes(run.rest), upstream=spec["upstream"])
    info["llm_heads"] = int(model.language_model.cfg.num_heads)
    info["vit_heads"] = int(model.vision_model.cfg.num_heads)
    info["opt_moments_ok"] = moments == 2 * 4 * n_train
    info["trainable_ok"] = n_train == n_lora == spec["expected_trainable"]
    return run, info


def top_temp_buffers(dump_dir: Path, n: int) -> list[str]:
    """The ``n`` largest values in the step's preallocated temp allocation, from XLA's
    buffer-assignment dump (``--top_buffers``): 'GiB  shape  instruction'."""
    files = sorted(dump_dir.glob("*jit_step*buffer-assignment.txt"), key=lambda f: f.stat().st_mtime)
    if not files:
        return []
    values, in_temp = [], False
    pat = re.compile(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (.*)")
    for line in files[-1].read_text().splitlines():
        if line.startswith("allocation"):
            in_temp = "preallocated-temp" in line
            continue
        m = pat.search(line) if in_temp else None
        if m:
            values.append((int(m.group(2)), m.group(3).split("{")[0], m.group(1)))
    values.sort(reverse=True)
    return [f"{size / GiB:6.2f} GiB  {shape}  {name}" for size, shape, name in values[:n]]


def compile_step(run, info, layout: tuple[int, int, int], grad_accum: int) -> dict:
    rows, tokens, tiles = layout
    t0 = time.perf_counter()
    lowered = run.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    return dict(rows_per_micro=rows, tokens_per_row=tokens, tiles_per_row=tiles, grad_accum=grad_accum,
                batch_rows=rows * grad_accum, image_tokens_per_row=tiles * TOKENS_PER_TILE,
                batch_bytes=tree_bytes(run.batch_spec()), lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
                argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                generated_code_bytes=int(ma.generated_code_size_in_bytes),
                # one (rows, heads, T, T) float32 score tensor of the plain XLA attention, per micro-batch
                llm_attn_scores_bytes=rows * info["llm_heads"] * tokens ** 2 * 4,
                vit_attn_scores_bytes=rows * tiles * info["vit_heads"] * (TILE // 14 * (TILE // 14) + 1) ** 2 * 4,
                peak_bytes=arg + out - alias + temp)


def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def print_table(rows: list[dict]) -> None:
    head = ("model", "rows x tokens", "tiles", "trainable params", "frozen bytes", "opt-state bytes",
            "XLA temp bytes", "total per-device GiB", "compile s", "upstream figure (GPUs x GB)")
    table = [head]
    for r in rows:
        c = r["compile"]
        rows_tokens = f"{c['grad_accum']} x {c['rows_per_micro']} x {c['tokens_per_row']}"
        tiles = f"{c['grad_accum']} x {c['rows_per_micro']} x {c['tiles_per_row']}"
        table.append((r["model"], rows_tokens, tiles, f"{r['trainable_params']:,}",
                      f"{r['frozen_bytes']:,} ({gib(r['frozen_bytes'])} GiB)",
                      f"{r['opt_state_bytes']:,}", f"{c['temp_bytes']:,} ({gib(c['temp_bytes'])} GiB)",
                      gib(c["peak_bytes"]), f"{c['compile_s']}", r["upstream"]))
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    for j, t in enumerate(table):
        print(" | ".join(str(v).ljust(w) for v, w in zip(t, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


NOTES = """notes:
  * rows x tokens / tiles = grad_accum x rows per micro-batch x tokens (tile slots) per row; one micro-batch
    holds upstream's per-device batch (4 samples <= 4096 tokens, <= 13 tiles of 448 each).
  * total per-device = argument + output - alias + temp bytes of compiled.memory_analysis(): the step's
    buffers (params, frozen, optimizer state, batch, activations under remat 'full'), one device, no mesh.
  * this is CPU XLA's buffer plan: GPU XLA fuses / schedules differently and uses other attention kernels;
    treat it as an estimate, not a measured GPU peak (no allocator fragmentation, no CUDA context / workspace).
  * opt-state bytes = Adam mu + nu in float32 (2 x 4 bytes x trainable) + the optimizer's int32 step counters.
  * CPU XLA runs bf16 dots in float32: it keeps float32 copies of the stacked bf16 frozen weights (hoisted
    out of the layer scan) and float32 activations, which a GPU plan would not; CPU temp overstates GPU temp.
  * attention follows config.model.attention (default 'blockwise': memory linear in T); with 'xla' the
    (rows, heads, T, T) float32 scores dominate temp and grow with T^2.
  * Phi-3 vocab 32020 and <IMG_CONTEXT> 32013 are computed (reference: "verify"); longrope factors are
    placeholders (they change the rotary tables only)."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mini2b,mini4b", help="comma list of " + ",".join(MODELS))
    ap.add_argument("--layouts", default=None, help="comma list of " + ",".join(LAYOUTS) + " (default: both)")
    ap.add_argument("--quick", action="store_true", help="1 row x 4096 tokens, 13 tiles (one upstream sample)")
    ap.add_argument("--grad_accum", type=int, default=2, help="micro-batches per step (upstream LoRA: 2)")
    ap.add_argument("--top_buffers", type=int, default=0,
                    help="list the N largest values of the temp allocation (XLA buffer-assignment dump to a temp dir; "
                         "values share that allocation over time, they are not all live at once)")
    ap.add_argument("--out", default=str(RESULTS / "lora_memory.json"))
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {sorted(MODELS)}")
    if args.quick:
        layouts_ = dict(QUICK_LAYOUTS)
    else:
        names = [n.strip() for n in (args.layouts or ",".join(LAYOUTS)).split(",") if n.strip()]
        for n in names:
            if n not in LAYOUTS:
                ap.error(f"unknown layout {n!r}; choose from {sorted(LAYOUTS)}")
        layouts_ = {n: LAYOUTS[n] for n in names}

    dump_dir = None
    if args.top_buffers:
        # must be set before the CPU backend starts (the first compile below)
        dump_dir = Path(tempfile.mkdtemp(prefix="lora_memory_xla_"))
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}").strip()
    t_start = time.perf_counter()
    results = []
    for m in models:
        for lname, layout in layouts_.items():
            t0 = time.perf_counter()
            run, info = build(m, layout, args.grad_accum)
            build_s = time.perf_counter() - t0
            print(f"{info['model']} ({lname}): built abstractly in {build_s:.1f}s; trainable {info['trainable_params']:,} "
                  f"(expected {info['expected_trainable']:,}: {'ok' if info['trainable_ok'] else 'MISMATCH'}); "
                  f"Adam moments {info['opt_moment_bytes']:,} B = 2 x 4 x trainable: "
                  f"{'ok' if info['opt_moments_ok'] else 'MISMATCH'}", flush=True)
            c = compile_step(run, info, layout, args.grad_accum)
            print(f"  {lname}: lower {c['lower_s']}s, compile {c['compile_s']}s, temp {gib(c['temp_bytes'])} GiB, "
                  f"peak {gib(c['peak_bytes'])} GiB; one LLM attention score tensor (rows, heads, T, T) f32 = "
                  f"{gib(c['llm_attn_scores_bytes'])} GiB, ViT {gib(c['vit_attn_scores_bytes'])} GiB", flush=True)
            if args.top_buffers:
                c["top_temp_buffers"] = top_temp_buffers(dump_dir, args.top_buffers)
                for line in c["top_temp_buffers"]:
                    print(f"      {line}")
            results.append(dict(info, layout=lname, build_s=round(build_s, 1), compile=c))
    total_s = time.perf_counter() - t_start

    print()
    print_table(results)
    print()
    print(NOTES)
    print(f"\ntotal wall time {total_s:.0f}s on {platform.processor() or platform.machine()} "
          f"({os.cpu_count()} cpus visible), jax {jax.__version__}, backend {jax.default_backend()}")

    if dump_dir is not None:
        shutil.rmtree(dump_dir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(bench="lora_memory", quick=args.quick, grad_accum=args.grad_accum, jax=jax.__version__,
                   backend=jax.default_backend(), total_s=round(total_s, 1), notes=NOTES, results=results)
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    ok = all(r["trainable_ok"] and r["opt_moments_ok"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
