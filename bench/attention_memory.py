"""Temporary memory of one decoder attention, forward + backward, for the ``xla`` and ``blockwise``
backends, from XLA's buffer assignment of the AOT-compiled function (nothing is allocated: every
input is a ``jax.ShapeDtypeStruct``).

    python bench/attention_memory.py                          # T = 4096, 8192, 16384
    python bench/attention_memory.py --lengths 2048 --block 256

The function is the attention core of ``mmjax.models.decoder.Attention`` on one packed row:
q (1, T, 16, 128), k / v (1, T, 8, 128) in bfloat16 (Mini-InternVL-2B / InternLM2-1.8B heads, GQA),
int32 segment ids and positions; it returns the output and dq, dk, dv for an output cotangent
(``jax.vjp``). ``xla`` builds the dense mask with ``attention.attention_mask`` and calls
``attention.dot_product_attention``; ``blockwise`` calls ``attention.blockwise_attention``.

This is the CPU backend's buffer plan: GPU XLA fuses and schedules differently, so read it as the
size of what the step keeps live, not a measured GPU peak. Results: a table on stdout and
``bench/results/attention_memory.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mmjax.models.attention import BLOCKWISE_BLOCK_SIZE, attention_mask, blockwise_attention, dot_product_attention

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MiB = 2 ** 20


def attention_fn(backend: str, block: int):
    def attend(q, k, v, seg, pos):
        scale = q.shape[-1] ** -0.5
        if backend == "xla":
            return dot_product_attention(q, k, v, attention_mask(seg, None, pos, pos, causal=True), scale=scale)
        return blockwise_attention(q, k, v, seg, None, pos, pos, causal=True, scale=scale,
                                   block_q=block, block_kv=block)

    def fwd_bwd(q, k, v, seg, pos, ct):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, pos), q, k, v)
        return (out,) + vjp(ct)

    return fwd_bwd


def measure(backend: str, t: int, *, heads: int, kv_heads: int, head_dim: int, block: int, dtype) -> dict:
    q = jax.ShapeDtypeStruct((1, t, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, t, kv_heads, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(attention_fn(backend, block)).lower(q, kv, kv, ids, ids, q).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    return dict(T=t, backend=backend, block=block if backend == "blockwise" else None,
                temp_bytes=int(ma.temp_size_in_bytes), argument_bytes=int(ma.argument_size_in_bytes),
                output_bytes=int(ma.output_size_in_bytes), compile_s=round(seconds, 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--backends", nargs="+", default=["xla", "blockwise"])
    ap.add_argument("--block", type=int, default=BLOCKWISE_BLOCK_SIZE)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=128)
    ap.add_argument("--out", default=str(RESULTS / "attention_memory.json"))
    args = ap.parse_args(argv)

    rows = []
    print(f"{'T':>6} | {'backend':<9} | {'temp bytes':>15} | {'temp MiB':>10} | {'args+out MiB':>12} | compile s")
    for t in args.lengths:
        for backend in args.backends:
            r = measure(backend, t, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        block=args.block, dtype=jnp.bfloat16)
            rows.append(r)
            print(f"{t:>6} | {backend:<9} | {r['temp_bytes']:>15,} | {r['temp_bytes'] / MiB:>10.1f} | "
                  f"{(r['argument_bytes'] + r['output_bytes']) / MiB:>12.1f} | {r['compile_s']:.1f}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(jax=jax.__version__, backend=jax.default_backend(), platform=platform.platform(),
                batch=1, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype="bfloat16",
                what="forward + backward (jax.vjp) of one causal packed attention")
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
