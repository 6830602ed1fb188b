"""InternLM-XComposer2: packed rows against one conversation per row (upstream's batch size 1), same
samples, same tiny model, on this machine.

    python bench/xcomposer_packing.py                  # 48 samples
    python bench/xcomposer_packing.py --samples 16     # a smoke run

A tiny random IXC2-4KHD-style checkpoint (the test suite's writer: CLIP 128 x 2 layers at 56-px
crops, partial-LoRA InternLM2 256 x 4 layers) and a generated XComposer JSON list (30 % text-only,
the rest one HD image of a random aspect, answers of 20-300 tokens) train through
``mmjax.train.setup.build_run``: (a) ``data.packing='first_fit'`` rows of ``--pack`` tokens, (b)
``data.packing='none'``: each conversation alone in a row of ``--pack`` tokens (static shapes:
padding chunks and attention tiles are skipped, but each conversation is its own step), one pass
over the samples each after one warm-up step; samples/s and real tokens/s per side.

Results: a table on stdout and ``bench/results/xcomposer_packing.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

WORDS = "the a red blue green square circle picture shows left right top bottom of in and is with".split()


def make_data(out: Path, n: int, seed: int = 0) -> tuple[Path, list[str]]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    records, corpus = [], []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS, int(rng.integers(20, 300))))
        rec = {"id": i, "conversations": [{"from": "user", "value": "Describe what you see."},
                                          {"from": "assistant", "value": answer}]}
        if rng.random() >= 0.3:
            w, h = int(rng.integers(40, 400)), int(rng.integers(40, 400))
            name = f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out / name)
            rec["image"] = [name]
        records.append(rec)
        corpus.append(answer)
    (out / "data.json").write_text(json.dumps(records))
    return out / "data.json", corpus


def config(data: Path, ckpt: str, packing: str, pack: int):
    from mmjax.config import base_config
    c = base_config()
    c.model_path = ckpt
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.token_chunk = 256
    c.data.data_txt = str(data)
    c.data.template = "ixc2"
    c.data.image_size = 56
    c.data.num_image_token = 4        # a 56-px crop: 4 x 4 patches, 2 x 2 merged
    c.data.hd_num = 6
    c.data.max_length = pack
    c.data.pack_max_length = pack
    c.data.max_tiles_per_pack = 32
    c.data.batch_size = 1
    c.data.packing = packing
    c.data.shuffle = False
    c.total_steps = 100000
    c.eval.enabled = False
    return c


def run_side(cfg, n_samples: int) -> dict:
    import jax

    from mmjax.train.setup import build_run
    run = build_run(cfg)
    state, it = run.state, iter(run.loader)
    t0 = time.perf_counter()
    state, m = run.step_fn(state, run.frozen, run.rest, run.to_global(next(it)))    # warm-up (compile)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    seen = tokens = steps = 0
    times = []
    while seen < n_samples:
        host = next(it)
        batch = run.to_global(host)
        t = time.perf_counter()
        state, m = run.step_fn(state, run.frozen, run.rest, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
        seen += int(host["num_samples"].sum())
        tokens += int(host["num_real_tokens"].sum())
        steps += 1
    total = sum(times)
    return {"steps": steps, "samples": seen, "real_tokens": tokens, "seconds": total,
            "samples_per_s": seen / total, "tokens_per_s": tokens / total,
            "median_step_s": statistics.median(times), "first_step_s": first}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--pack", type=int, default=2048, help="tokens per row (both sides)")
    p.add_argument("--workdir", default=str(RESULTS / "_work" / "xcomposer_packing"))
    args = p.parse_args(argv)
    from tests import ixc2_reference as ref

    work = Path(args.workdir)
    data, corpus = make_data(work / "data", args.samples)
    tok = ref.build_ixc2_tokenizer(str(work / "tok"), corpus + ["Describe what you see."])
    ckpt = str(work / "ckpt")
    if not (work / "ckpt" / "config.json").exists():
        ref.write_tiny_checkpoint(ckpt, "hd", vocab_size=len(tok), hidden_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=768, plora_r=32,
                                  qkv_plora_r=8, vit_hidden=128, vit_layers=2, vit_heads=2, vit_intermediate=512,
                                  vit_image_size=56, max_position_embeddings=4096)
        tok.save_pretrained(ckpt)
    rows = {}
    for name, packing in (("packed", "first_fit"), ("one per row", "none")):
        rows[name] = run_side(config(data, ckpt, packing, args.pack), args.samples)
    gain = rows["packed"]["samples_per_s"] / rows["one per row"]["samples_per_s"]
    print(f"\nXComposer2 tiny (4KHD-style), {args.samples} samples, rows of {args.pack} tokens, "
          f"{platform.processor() or platform.machine()}")
    print("| side | steps | samples/s | real tokens/s | median step | first step |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['median_step_s'] * 1e3:.0f} ms | {r['first_step_s']:.1f} s |")
    print(f"packed / one per row: {gain:.2f}x samples/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "xcomposer_packing.json").write_text(json.dumps({"args": vars(args), "rows": rows, "gain": gain},
                                                                indent=1))


if __name__ == "__main__":
    main()
