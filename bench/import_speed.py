"""Importing an HF checkpoint: peak host RSS and read speed of ``mmjax.from_pretrained``.

    python bench/import_speed.py                 # Mini-InternVL-Chat-2B-V1-5 shapes, bf16 (4.4 GB)
    python bench/import_speed.py --model tiny    # a ~60 MB model of the same layout (smoke run)

A random checkpoint with the real tensor names and shapes of the upstream ``internvl_chat``
layout (InternViT-300M + MLP projector + InternLM2-1.8B, bf16, split into 2 GB shards with an
index, as ``save_pretrained`` writes them) is written once to ``--dir`` (kept; reused when present).
Its files are then read once (a warm page cache, as after a download or a first run) and a fresh
process imports it with ``from_pretrained(dir, dtype=--dtype)``, reporting the wall time of the
call, the checkpoint bytes per second, and the process's peak RSS against the checkpoint bytes
(``ru_maxrss``; on CPU the device memory is this host memory, so the placed weights count too).
Nothing runs on an accelerator; table on stdout, JSON in ``bench/results/import_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GiB = 2 ** 30
SHARD_BYTES = 2 * 10 ** 9


def model_config(name: str) -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    from lora_memory import INTERNLM2_1_8B, INTERNVIT_300M, internvl_chat_config
    if name == "mini2b":
        return internvl_chat_config(INTERNLM2_1_8B, "internlm2-chat")
    vit = dict(INTERNVIT_300M, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    llm = dict(INTERNLM2_1_8B, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=512, vocab_size=92553)
    return internvl_chat_config(llm, "internlm2-chat")


def write_checkpoint(directory: Path, config: dict, dtype: str = "BF16") -> int:
    """The model's HF tensors (names and shapes from its weight rules), random values, sharded."""
    import numpy as np
    from mmjax.weights import layouts
    from mmjax.weights.loader import _hf_shape
    from mmjax.weights.rules import get_path
    from mmjax.weights.safetensors_io import np_dtype, write_file, write_index
    from flax import nnx

    from mmjax.models.options import ModelOptions
    model = layouts.build_abstract(layouts.detect_layout(config), config, dtype="bfloat16", directory=None,
                                   options=ModelOptions(img_context_token_id=92546))
    params = nnx.state(model, nnx.Param)
    specs = {}
    for key, (rule, layer) in layouts.weight_table(model).items():
        shape = tuple(get_path(params, rule.path).shape)
        specs[key] = (dtype, _hf_shape(rule, shape if layer is None else shape[1:]))
    shards, current, size = [], {}, 0
    for key, (dt, shape) in specs.items():
        nbytes = int(np.prod(shape)) * np_dtype(dt).itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = (dt, shape)
        size += nbytes
    shards.append(current)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np_dtype(dtype))

    def produce(key):   # a random block tiled over the tensor (fast; values are not what is measured)
        shape = specs[key][1]
        n = int(np.prod(shape))
        return np.resize(block, n).reshape(shape)

    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_file(str(directory / fname), shard, produce, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    write_index(str(directory), weight_map, {"total_size": total})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def warm(directory: Path) -> None:
    for p in sorted(directory.glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def child(args) -> None:
    import resource
    import jax
    from flax import nnx
    import mmjax
    from mmjax.weights import layouts, loader   # noqa: F401  (imports are not part of the read)
    from mmjax.models import internlm2, internvit, internvl   # noqa: F401
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = mmjax.from_pretrained(args.dir, dtype=args.dtype, img_context_token_id=92546)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(dict(wall_s=wall, peak_rss=peak, base_rss=base)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("mini2b", "tiny"), default="mini2b")
    p.add_argument("--dtype", default="bfloat16", help="from_pretrained dtype (compute and parameters)")
    p.add_argument("--dir", default=None, help="where the random checkpoint is written (default bench/results/import_<model>)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dir = args.dir or str(RESULTS / f"import_{args.model}")
    if args.child:
        child(args)
        return 0
    directory = Path(args.dir)
    if not (directory / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(directory, model_config(args.model))
        print(f"wrote the random checkpoint to {directory} in {time.perf_counter() - t:.0f} s", flush=True)
    nbytes = checkpoint_bytes(directory)
    warm(directory)
    out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--dtype", args.dtype,
                          "--dir", args.dir], capture_output=True, text=True, cwd=ROOT)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        sys.stderr.write(out.stderr[-4000:])
        print(f"import failed (exit {out.returncode})")
        return 1
    r = json.loads(line[0][7:])
    res = dict(model=args.model, dtype=args.dtype, checkpoint_bytes=nbytes, wall_s=r["wall_s"],
               gb_per_s=nbytes / r["wall_s"] / 1e9, peak_rss_gib=r["peak_rss"] / GiB,
               rss_over_checkpoint=r["peak_rss"] / nbytes, base_rss_gib=r["base_rss"] / GiB,
               jax=__import__("jax").__version__)
    print("| model | dtype | checkpoint | import wall | read speed | peak RSS (x checkpoint) | RSS before import |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.model} | {args.dtype} | {nbytes / 1e9:.2f} GB | {res['wall_s']:.1f} s | {res['gb_per_s']:.2f} GB/s | "
          f"{res['peak_rss_gib']:.2f} GiB ({res['rss_over_checkpoint']:.2f}x) | {res['base_rss_gib']:.2f} GiB |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "import_speed.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
