"""The memory planner over the seed configs: full fine-tuning and LoRA on 8 x A100/H100-80GB
(8 devices) and a TPU v5p-8 slice (4 chips), each device holding one packed row a micro-batch.

    python bench/plan_table.py                 # every seed config, 8 and 4 devices
    python bench/plan_table.py --configs mini2b,mini2b_lora --devices 8

Each row is ``python -m mmjax.plan --config=configs/<name>.py --config.mesh.fsdp=<n>
--config.data.batch_size=<n x grad_accum>`` in its own process (the device count is fixed when
JAX starts); the global batch is scaled so that every device's micro-batch is one row of the
config's ``pack_max_length`` tokens. Prints a markdown table; JSON in bench/results/plan_table.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
CONFIGS = ["mini2b", "mini2b_lora", "mini4b", "mini4b_lora", "internvl_chat_v1_5", "internvl_chat_v1_5_lora"]
# the upstream tools' published figures (InternVL docs, 1.5 fine-tuning): GPUs x GB per GPU, batch per GPU
UPSTREAM = {
    "mini2b": "8 x ~30 GB (per-device 1 sample)", "mini2b_lora": "2 x ~27 GB (per-device 4)",
    "mini4b": "8 x ~40 GB (per-device 1)", "mini4b_lora": "2 x ~19 GB (per-device 4)",
    "internvl_chat_v1_5": "8 x ~77 GB (per-device 2, ZeRO-3)", "internvl_chat_v1_5_lora": "2 x ~79 GB",
}


def grad_accum_of(name: str) -> int:
    sys.path.insert(0, str(ROOT))
    from mmjax.config import sibling_config
    return int(sibling_config(str(ROOT / "configs" / "tiny.py"), name).grad_accum)


def plan_one(name: str, n: int) -> dict:
    accum = grad_accum_of(name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "mmjax.plan", f"--config=configs/{name}.py", f"--config.mesh.fsdp={n}",
               f"--config.data.batch_size={n * accum}", f"--json={out}"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{p.stderr[-3000:]}")
        plan = json.loads(out.read_text())
    plan["command"] = " ".join(["python"] + cmd[1:-1])
    return plan


def row(plan: dict) -> list[str]:
    p, b = plan["per_device_bytes"], plan["batch"]
    n = plan["mesh"]["fsdp"] * plan["mesh"]["data"] * plan["mesh"]["tensor"]
    g = lambda x: f"{x / GiB:.1f}"
    kinds = ("a100-80g", "h100-80g") if n == 8 else ("v5p",)   # 8 GPUs, or a v5p-8 slice's 4 chips
    fits = ", ".join(f"{k} {'yes' if plan['fits'][k]['fits'] else 'no'}" for k in kinds)
    return [plan["config"], str(n), f"{b['tokens_per_row']:,} tokens, {b['tiles_per_row']} tiles",
            g(p["trainable parameters"] + p["frozen parameters"]), g(p["optimizer state"]),
            g(p["activations + temporaries"] + p["batch"]), g(plan["total_bytes"]), fits,
            UPSTREAM.get(plan["config"], "")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--devices", default="8,4", help="comma list of device counts (8: 8 GPUs; 4: a v5p-8 slice)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "plan_table.json"))
    args = ap.parse_args(argv)
    plans = [plan_one(c, int(n)) for c in args.configs.split(",") for n in args.devices.split(",")]
    head = ["config", "devices", "per-device micro-batch", "params GiB", "optimizer GiB",
            "activations + batch GiB", "total GiB", "fits", "upstream (GPUs x memory)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for plan in plans:
        print("| " + " | ".join(row(plan)) + " |")
    print(f"\ncompiled for: {sorted({p['compiled_for'] for p in plans})}; jax {plans[0]['jax']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(plans, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
