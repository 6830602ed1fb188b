"""What the user sees: per-step metrics in ``metrics.jsonl`` and TensorBoard, a progress line
with ETA, and the FLOPs model behind MFU (decoder 6·N·tokens + causal attention, ViT per tile)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

# dense bf16 peak FLOP/s per device, by jax device_kind prefix
PEAK_FLOPS = {
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
    if override and override > 0:
        return float(override)
    kind = jax.devices()[0].device_kind
    for prefix, v in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return v
    return None


class FlopsModel:
    """Training FLOPs of one step from its token / tile counts.

    decoder: 6 · N_decoder (incl. lm_head, excl. the embedding lookup) per real token, plus causal
    attention 6 · layers · q_width · tokens · mean_segment_length; ViT: (6 if trained else 2) ·
    N_vit · tokens_per_tile per tile, plus its full attention.
    """

    def __init__(self, dec_params: int, dec_layers: int, dec_q_width: int, vit_params: int = 0,
                 vit_layers: int = 0, vit_width: int = 0, vit_tokens_per_tile: int = 0, vit_trained: bool = False):
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def step_flops(self, real_tokens: float, num_samples: float, tiles: float) -> float:
        mean_seg = real_tokens / max(num_samples, 1.0)
        dec = 6.0 * self.dec_params * real_tokens + 6.0 * self.dec_layers * self.dec_q_width * real_tokens * mean_seg
        mult = 6.0 if self.vit_trained else 2.0
        t = self.vit_tokens_per_tile
        vit = tiles * (mult * self.vit_params * t + mult * 2 * self.vit_layers * self.vit_width * t * t)
        return dec + vit


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._f = open(self.path, "a") if self.enabled else None
        self._tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard files are optional; metrics.jsonl always exists
                self._tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}
        self._f.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self):
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    h, m, sec = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class Progress:
    """One line per logged step: ``[step/total pct] metrics | elapsed < ETA``."""

    def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
        self.total, self.start, self.stream = total_steps, start_step, stream
        self.t0 = self._last = time.time()

    def tick(self) -> float:
        """Seconds since the previous tick (one step, when called once per finished step)."""
        now = time.time()
        dt, self._last = max(now - self._last, 1e-9), now
        return dt

    def line(self, step: int, m: dict) -> str:
        done = step - self.start
        el = time.time() - self.t0
        eta = el / max(done, 1) * (self.total - step)
        pct = 100.0 * step / max(self.total, 1)
        bar_w = 20
        fill = int(bar_w * step / max(self.total, 1))
        parts = [f"loss {m['train/loss']:.4f}", f"lr {m['train/lr']:.2e}", f"gnorm {m['train/grad_norm']:.3f}",
                 f"tok/s {m.get('perf/tokens_per_s', 0):,.0f}", f"samples/s {m.get('perf/samples_per_s', 0):.1f}",
                 f"tiles/s {m.get('perf/tiles_per_s', 0):.1f}", f"pad {100 * m.get('data/padding_fraction', 0):.1f}%"]
        if "perf/mfu" in m:
            parts.append(f"MFU {100 * m['perf/mfu']:.1f}%")
        if m.get("train/skipped"):
            parts.append("SKIPPED(non-finite)")
        return (f"[{'#' * fill}{'.' * (bar_w - fill)}] {step}/{self.total} {pct:3.0f}% | " + " | ".join(parts)
                + f" | {fmt_duration(el)} < {fmt_duration(eta)}")

    def show(self, step: int, m: dict) -> None:
        print(self.line(step, m), file=self.stream, flush=True)
