"""mmjax against the PyTorch stack it replaces, on one machine, the same model and the same data.

    python bench/compare_torch.py                 # (a) both shapes, 20 steps; (b) the realistic mix
    python bench/compare_torch.py --quick         # fewer steps and samples (a smoke run, not a figure)
    python bench/compare_torch.py --parts a --steps 10

The model: one transformers ``InternVLForConditionalGeneration`` (Qwen3 text 512 x 8 layers,
InternViT-style vision 384 x 6 layers, 448-px tiles, vocab 32k, ~70M parameters), random init,
written once with ``save_pretrained`` and loaded unchanged by both sides (mmjax reads the
safetensors through ``mmjax.train.setup.build_run``). float32 on both sides, AdamW (betas 0.9 /
0.999, eps 1e-8, decay 0.01, lr 1e-4 constant, clip 1.0). The torch side is transformers' model
with SDPA attention and ``torch.optim.AdamW(fused=True)``; each side runs in its own process,
sides alternate, and each child reports per-step times, losses and its peak RSS. mmjax runs its
step as a training config would set it (the flags below): blockwise attention, the ViT on real
tiles only, and the ``dots_saveable`` remat policy (matmul outputs kept, the elementwise work
recomputed in the backward pass: the same step time as no remat, measured, and ~1.4 GiB less).

(a) The same padded work: identical batches (rows x tokens, tiles per row, the prompt half of each
row masked, the answer half supervised); per side steps/s, tokens/s, first step (mmjax: trace +
compile + run), peak RSS, and the loss parity of the steps (max relative difference per step).

(b) The same samples batched each tool's way, on a realistic mix (30 % text-only, 1-13 tiles,
100-4000 tokens a sample): torch as upstream InternVL's collator does (a per-device batch of
``--mix_batch`` samples padded to its longest, one dummy tile for a text-only sample, the ViT
run on every tile and the dummy features dropped), mmjax as it trains (first-fit packed rows of
``--pack`` tokens with a tile budget per row, the ViT on the real tiles only). One epoch of the
samples, every batch timed, after one warm-up step on the first batch; samples/s.

Results: a table on stdout and ``bench/results/compare_torch.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

VOCAB, IMAGE_TOKEN, TILE, TOKENS_PER_TILE = 32000, 31999, 448, 256
LR, WD, CLIP = 1e-4, 0.01, 1.0
SHAPES = {"4x1024_8tiles": (4, 1024, 2), "1x4096_4tiles": (1, 4096, 4)}   # rows, tokens, tiles per row


def model_config():
    from transformers import InternVLConfig
    vision = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                  image_size=TILE, patch_size=14, norm_type="layer_norm", attention_bias=True, use_qk_norm=False,
                  layer_norm_eps=1e-6, hidden_act="gelu")
    text = dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, intermediate_size=1536, rms_norm_eps=1e-6,
                max_position_embeddings=8192, tie_word_embeddings=False, rope_theta=1e6)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                          image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, projector_hidden_act="gelu",
                          vision_feature_layer=-1, tie_word_embeddings=False)


def write_model(out: Path) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration
    if (out / "config.json").exists():
        return
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(model_config()).to(torch.float32)
    model.save_pretrained(out)


# ---- data -----------------------------------------------------------------------------------------


def sample(rng, n_tokens: int, n_tiles: int) -> dict:
    """One conversation: ``n_tiles`` image blocks then text, the first half a prompt (masked), the
    second half the answer (supervised)."""
    ids = rng.integers(0, VOCAB - 1, size=n_tokens).astype(np.int32)
    ids[:n_tiles * TOKENS_PER_TILE] = IMAGE_TOKEN
    labels = ids.copy()
    prompt = max(n_tiles * TOKENS_PER_TILE, n_tokens // 2)
    labels[:prompt] = -100
    pixels = rng.standard_normal((n_tiles, TILE, TILE, 3)).astype(np.float32)
    return dict(input_ids=ids, labels=labels, pixel_values=pixels)


def padded_batches(shape: tuple[int, int, int], steps: int, seed: int = 0) -> list[list[dict]]:
    rows, tokens, tiles = shape
    rng = np.random.default_rng(seed)
    return [[sample(rng, tokens, tiles) for _ in range(rows)] for _ in range(steps)]


def mix_samples(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tiles = 0 if rng.random() < 0.3 else int(rng.integers(1, 14))
        lo = max(100, tiles * TOKENS_PER_TILE + 50)
        out.append(sample(rng, int(rng.integers(lo, max(lo + 1, 4000))), tiles))
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


# ---- torch side -------------------------------------------------------------------------------------


def torch_child(args) -> dict:
    import torch
    from transformers import InternVLForConditionalGeneration
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration.from_pretrained(args.model_dir, dtype=torch.float32,
                                                             attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, fused=True)
    inner = model.model

    def loss_of(batch):
        """Upstream InternVL's forward: the ViT on every tile (dummy ones too), real features scattered."""
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        embeds = inner.get_input_embeddings()(ids)
        if batch["pixel_values"] is not None:
            feats = inner.get_image_features(pixel_values=batch["pixel_values"], vision_feature_layer=-1,
                                             vision_feature_select_strategy="default")
            feats = getattr(feats, "pooler_output", feats)   # transformers 5 returns the vision outputs
            feats = feats[batch["image_flags"] == 1].reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], feats.to(embeds.dtype))
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        return out.loss

    def step(batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    batches = [torch_batch(b) for b in load_batches(args)]
    return run_steps(step, batches, counts=[batch_counts(b) for b in load_batches(args)], warmup=args.part == "b")


def torch_batch(samples: list[dict]) -> dict:
    """Upstream's collator: pad to the longest sample, a dummy tile (flag 0) for a text-only one."""
    import torch
    n = max(len(s["input_ids"]) for s in samples)
    ids = np.zeros((len(samples), n), np.int64)
    labels = np.full((len(samples), n), -100, np.int64)
    mask = np.zeros((len(samples), n), np.int64)
    tiles, flags = [], []
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = s["input_ids"], s["labels"], 1
        if len(s["pixel_values"]):
            tiles.append(s["pixel_values"])
            flags += [1] * len(s["pixel_values"])
        else:
            tiles.append(np.zeros((1, TILE, TILE, 3), np.float32))
            flags.append(0)
    pv = torch.from_numpy(np.ascontiguousarray(np.concatenate(tiles).transpose(0, 3, 1, 2)))
    return dict(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels), attention_mask=torch.from_numpy(mask),
                pixel_values=pv, image_flags=torch.tensor(flags))


# ---- mmjax side -------------------------------------------------------------------------------------


def mmjax_config(args, rows: int, tokens: int, tiles_per_row: int):
    from mmjax.config import base_config
    c = base_config()
    c.name = "compare_torch"
    c.model_path = args.model_dir
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat = args.remat
    c.model.attention = args.attention
    c.model.attention_block = args.attention_block
    c.model.token_chunk = args.token_chunk
    c.model.vit_attention = args.vit_attention
    c.model.vit_tile_chunk = args.vit_tile_chunk
    c.freeze.backbone = False
    c.data.template = "qwen3"     # unused: the batches are built here
    c.data.batch_size = rows
    c.data.pack_max_length = tokens
    c.data.max_tiles_per_pack = tiles_per_row
    c.data.image_size = TILE
    c.optim.lr, c.optim.weight_decay, c.optim.clip_norm = LR, WD, CLIP
    c.optim.schedule, c.optim.warmup_ratio = "constant", 0.0
    c.total_steps = 1000
    c.loss_chunk_size = 1024
    return c


def mmjax_child(args) -> dict:
    import jax
    from mmjax.train.setup import build_run
    groups = load_batches(args)
    if args.part == "a":
        rows, tokens, tiles = SHAPES[args.shape]
        host = [padded_rows(g, tokens, tiles) for g in groups]
    else:
        host = packed_rows(groups[0], args.pack, args.pack_tiles)
        rows, tokens, tiles = 1, args.pack, args.pack_tiles
        host = [{k: v[i:i + 1] for k, v in host.items()} for i in range(len(host["input_ids"]))]
    run = build_run(mmjax_config(args, rows, tokens, tiles), with_data=False)
    state = run.state

    def step(batch):
        nonlocal state
        state, m = run.step_fn(state, run.frozen, run.rest, run.to_global(batch))
        return float(jax.device_get(m["train/loss"]))

    counts = [dict(samples=int(b["num_samples"].sum()), tokens=int((b["segment_ids"] > 0).sum())) for b in host]
    return run_steps(step, host, counts=counts, warmup=args.part == "b")


def padded_rows(samples: list[dict], tokens: int, tiles_per_row: int) -> dict:
    """(a): one sample per row, exactly the torch batch's tokens and tiles (no padding)."""
    from mmjax.data import packing
    rows = [packing.pad_row(prep(s), max_tokens=tokens, max_tiles=tiles_per_row, pad_id=0,
                            image_shape=(TILE, TILE, 3)) for s in samples]
    return packing.collate(rows, batch_size=len(rows), empty=None)


def packed_rows(samples: list[dict], pack: int, pack_tiles: int) -> dict:
    """(b): the samples first-fit packed into rows of ``pack`` tokens / ``pack_tiles`` tiles (mmjax's packer)."""
    import grain
    from mmjax.data import packing
    ds = grain.MapDataset.source([prep(s) for s in samples]).to_iter_dataset()
    it = packing.pack(ds, algorithm="first_fit", max_tokens=pack, max_tiles=pack_tiles, pad_id=0, num_bins=16,
                      seed=0, max_samples_per_row=None)
    rows = [packing.finalize_row(r, max_tiles=pack_tiles, image_shape=(TILE, TILE, 3)) for r in it]
    return packing.collate(rows, batch_size=len(rows), empty=None)


def prep(s: dict) -> dict:
    from mmjax.data import packing
    return packing.prepare_sample(dict(s, image_flags=np.ones(len(s["pixel_values"]), np.int32)),
                                  loss_reduction="token", image_shape=(TILE, TILE, 3))


# ---- shared child loop --------------------------------------------------------------------------------


def batch_counts(samples: list[dict]) -> dict:
    return dict(samples=len(samples), tokens=int(sum(len(s["input_ids"]) for s in samples)))


def load_batches(args) -> list[list[dict]]:
    if args.part == "a":
        return padded_batches(SHAPES[args.shape], args.steps + 1)
    samples = mix_samples(args.mix_samples)
    if args.side == "torch":
        b = args.mix_batch
        return [samples[i:i + b] for i in range(0, len(samples), b)]
    return [samples]


def run_steps(step, batches, counts, warmup: bool = False) -> dict:
    """Times ``step`` over ``batches``. (a) the first step is the warm-up (compile) and the rest are
    the figure; (b) ``warmup``: one extra step on the first batch, then every batch timed, so each
    side's throughput counts exactly the same samples (one epoch)."""
    times, losses = [], []
    if warmup:
        t0 = time.perf_counter()
        step(batches[0])
        first = time.perf_counter() - t0
    for b in batches:
        t0 = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t0)
    if warmup:
        rest, timed = times, counts
    else:
        first, rest, timed = times[0], times[1:] or times, counts[1:] or counts
    n_samples = sum(c["samples"] for c in timed)
    n_tokens = sum(c["tokens"] for c in timed)
    return dict(first_step_s=first, step_times_s=times, median_step_s=statistics.median(rest),
                steps_per_s=len(rest) / sum(rest), samples_per_s=n_samples / sum(rest),
                tokens_per_s=n_tokens / sum(rest), losses=losses, steps=len(batches), peak_rss_gib=peak_rss_gib())


# ---- parent -----------------------------------------------------------------------------------------


def child(args) -> None:
    out = torch_child(args) if args.side == "torch" else mmjax_child(args)
    print("RESULT " + json.dumps(out), flush=True)


def spawn(args, side: str, part: str, shape: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--part", part, "--model_dir", args.model_dir,
           "--steps", str(args.steps), "--mix_samples", str(args.mix_samples), "--mix_batch", str(args.mix_batch),
           "--pack", str(args.pack), "--pack_tiles", str(args.pack_tiles), "--attention", args.attention,
           "--attention_block", str(args.attention_block), "--token_chunk", str(args.token_chunk),
           "--vit_attention", args.vit_attention, "--vit_tile_chunk", str(args.vit_tile_chunk),
           "--remat", args.remat]
    if shape:
        cmd += ["--shape", shape]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{side} child failed ({part} {shape}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    r = json.loads(lines[-1][len("RESULT "):])
    r["process_wall_s"] = time.perf_counter() - t0
    print(f"  {side:5s} {part} {shape or 'mix'}: median step {r['median_step_s']:.2f} s, first {r['first_step_s']:.1f} s, "
          f"{r['samples_per_s']:.2f} samples/s, peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    return r


def loss_parity(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 steps per shape, 12 mix samples (smoke run)")
    p.add_argument("--parts", default="a,b")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per shape after the first (default 20)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs per side")
    p.add_argument("--mix_samples", type=int, default=None, help="samples in the realistic mix (default 48)")
    p.add_argument("--mix_batch", type=int, default=4, help="torch: samples per batch (upstream per-device batch)")
    p.add_argument("--pack", type=int, default=8192, help="mmjax: tokens per packed row in (b)")
    p.add_argument("--pack_tiles", type=int, default=24, help="mmjax: tile budget per packed row in (b)")
    p.add_argument("--attention", default="blockwise", help="mmjax decoder attention backend")
    p.add_argument("--attention_block", type=int, default=256, help="mmjax decoder attention tile bound")
    p.add_argument("--token_chunk", type=int, default=0, help="mmjax: decoder tokens per chunk, padding chunks skipped")
    p.add_argument("--vit_attention", default="blockwise", help="mmjax ViT attention backend")
    p.add_argument("--vit_tile_chunk", type=int, default=8, help="mmjax: tiles per ViT call, empty slots skipped")
    p.add_argument("--remat", default="dots_saveable",
                   help="mmjax remat policy (dots_saveable: keep matmul outputs, recompute the elementwise rest)")
    p.add_argument("--model_dir", default=str(RESULTS / "compare_torch_model"))
    p.add_argument("--child", choices=("torch", "mmjax"), help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("a", "b"), help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    args.mix_samples = args.mix_samples or (12 if args.quick else 48)
    if args.child:
        args.side = args.child
        child(args)
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_model(Path(args.model_dir))
    parts = [x for x in args.parts.split(",") if x]
    jobs = [("a", s) for s in args.shapes.split(",") if s and "a" in parts] + ([("b", None)] if "b" in parts else [])
    rows = []
    for part, shape in jobs:
        runs = {"torch": [], "mmjax": []}
        for _ in range(args.repeats):
            for side in ("torch", "mmjax"):
                runs[side].append(spawn(args, side, part, shape))
        best = {side: min(rs, key=lambda r: r["median_step_s"]) for side, rs in runs.items()}
        t, m = best["torch"], best["mmjax"]
        row = dict(part=part, shape=shape or f"mix of {args.mix_samples}", torch=t, mmjax=m,
                   step_time_ratio=m["median_step_s"] / t["median_step_s"],
                   samples_per_s_ratio=m["samples_per_s"] / t["samples_per_s"],
                   first_step_ratio=m["first_step_s"] / t["first_step_s"],
                   peak_rss_ratio=m["peak_rss_gib"] / t["peak_rss_gib"])
        if part == "a":
            row["loss_parity_max_rel"] = loss_parity(m["losses"], t["losses"])
        rows.append(row)

    head = ("part", "work", "torch step s", "mmjax step s", "mmjax/torch", "torch samples/s", "mmjax samples/s",
            "samples/s ratio", "first step s (torch / mmjax)", "peak RSS GiB (torch / mmjax)", "loss parity")
    table = [head] + [(r["part"], r["shape"], f"{r['torch']['median_step_s']:.2f}", f"{r['mmjax']['median_step_s']:.2f}",
                       f"{r['step_time_ratio']:.2f}", f"{r['torch']['samples_per_s']:.2f}",
                       f"{r['mmjax']['samples_per_s']:.2f}", f"{r['samples_per_s_ratio']:.2f}",
                       f"{r['torch']['first_step_s']:.1f} / {r['mmjax']['first_step_s']:.1f}",
                       f"{r['torch']['peak_rss_gib']:.2f} / {r['mmjax']['peak_rss_gib']:.2f}",
                       f"{r['loss_parity_max_rel']:.1e}" if "loss_parity_max_rel" in r else "-") for r in rows]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    print()
    for j, t in enumerate(table):
        print(" | ".join(str(v).ljust(w) for v, w in zip(t, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))
    out = dict(bench="compare_torch", time=time.strftime("%Y-%m-%dT%H:%M:%S"), quick=args.quick, steps=args.steps,
               attention=args.attention, attention_block=args.attention_block, token_chunk=args.token_chunk, vit_attention=args.vit_attention, vit_tile_chunk=args.vit_tile_chunk, remat=args.remat, cpu_count=os.cpu_count(), platform=platform.platform(),
               rows=rows)
    path = RESULTS / "compare_torch.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
