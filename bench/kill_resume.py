"""The embedded default survives being killed: N random SIGKILL / SIGTERM points, then the same
losses at every step, the same exported weights (byte for byte) and the same held-out accuracy
as one uninterrupted run.

    python bench/kill_resume.py                       # configs/tiny.py, 20 interruptions
    python bench/kill_resume.py --kills 5 --seed 1 -- --config.num_epochs=1

Both runs are ``python -m mmjax.train`` subprocesses, as a user (or a scheduler) runs them; the
interrupted one is restarted with the same command after each interruption. The interruptions are
about as many of each kind, in a random order (the export kills once training is done):
  * ``kill-step``: SIGKILL once the run has logged a random step of the next two checkpoint
    intervals past where it resumed (the steps since the last checkpoint are lost and trained again);
  * ``term-step``: SIGTERM at a random step of the next 40 (the run saves the step in flight and
    exits 75);
  * ``kill-save``: SIGKILL while a checkpoint is being written (orbax's temporary directory exists);
  * ``kill-export``: SIGKILL while the HF export is being written (its temporary directory exists).
Arguments after ``--`` go to both runs. Results: a table on stdout and ``bench/results/kill_resume.json``
(git-ignored).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("kill-step", "term-step", "kill-save", "kill-export")


def command(workdir: str, config: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "mmjax.train", f"--config={config}", f"--workdir={workdir}", *extra]


def metrics_size(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.getsize(path) if os.path.exists(path) else 0


def logged_step(workdir: str, since: int = 0) -> int:
    """The newest step in metrics.jsonl, in what was written after byte ``since`` (a restart
    logs again the steps it trains again)."""
    path = os.path.join(workdir, "metrics.jsonl")
    step = 0
    if os.path.exists(path):
        with open(path) as f:
            f.seek(since)
            for line in f:
                try:
                    step = max(step, int(json.loads(line)["step"]))
                except (ValueError, KeyError):
                    pass   # a line being written
    return step


def losses(workdir: str) -> dict[int, float]:
    """step -> the last loss logged for it (a resumed run logs the steps it trains again)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "train/loss" in r:
                out[int(r["step"])] = r["train/loss"]
    return out


def accuracy(workdir: str) -> float | None:
    acc = None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            acc = r.get("eval/accuracy", acc)
    return acc


def export_digest(workdir: str) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(workdir, "hf", "*.safetensors"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def saving_since(ckpt: str, launched: float) -> bool:
    """An orbax save in progress that started after ``launched``."""
    for path in glob.glob(os.path.join(ckpt, "*.orbax-checkpoint-tmp*")):
        try:
            if os.stat(path).st_mtime > launched:
                return True
        except FileNotFoundError:   # committed or removed meanwhile
            pass
    return False


def wait_for(proc, predicate, poll_s: float = 0.005) -> bool:
    """True when ``predicate()`` held while ``proc`` ran; False when it ended first."""
    while proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll_s)
    return False


def checkpoint_step(workdir: str) -> int:
    """The newest complete checkpoint's step (where a restart resumes), 0 without one."""
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()] \
        if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    return max(steps, default=0)


def plan_kinds(kills: int, rng: random.Random) -> tuple[list[str], list[str]]:
    """(the training-time interruptions in a shuffled order, the export-time ones): every kind
    about as often; the export kills come once training is done."""
    exports = max(1, kills // 6) if kills > 1 else 0
    during = [KINDS[k % 3] for k in range(kills - exports)]
    rng.shuffle(during)
    return during, ["kill-export"] * exports


def interrupted_run(workdir: str, config: str, extra: list[str], kills: int, rng: random.Random, total: int,
                    every: int, log) -> list[dict]:
    events = []
    during, at_export = plan_kinds(kills, rng)
    while True:
        start = checkpoint_step(workdir)
        if start >= total:   # trained: only the export (and evaluation) is left to interrupt
            kind = at_export.pop() if at_export else None
            if kind is None and during:
                during.pop()
                kind = "kill-export"
        else:   # the export kills left wait for this run to train to its end
            kind = during.pop() if during else (at_export.pop() if at_export else None)
        # term: within 40 steps (it saves there); kill: within two checkpoint intervals, so it
        # passes a checkpoint about half the time
        span = {"term-step": 40, "kill-step": 2 * every}.get(kind, 0)
        target = rng.randint(start + 1, max(start + 1, min(total - 1, start + span))) if span else None
        since, launched = metrics_size(workdir), time.time()
        proc = subprocess.Popen(command(workdir, config, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        ckpt = os.path.join(workdir, "checkpoints")
        hit = False
        if kind in ("kill-step", "term-step"):
            hit = wait_for(proc, lambda: logged_step(workdir, since) >= target)
        elif kind == "kill-save":   # a save of this run: not the leftover of the last kill (removed at start-up)
            hit = wait_for(proc, lambda: saving_since(ckpt, launched))
        elif kind == "kill-export":
            hit = wait_for(proc, lambda: os.path.isdir(os.path.join(workdir, f"hf.tmp-{proc.pid}")))
        if hit:
            proc.send_signal(signal.SIGTERM if kind == "term-step" else signal.SIGKILL)
        rc = proc.wait()
        if hit:
            events.append({"kind": kind, "resumed_at": start, "stopped_after_step": logged_step(workdir, since),
                           "exit_status": rc})
            print(f"  {len(events):2d}. {kind:<11s} resumed at step {start:4d}, stopped after step "
                  f"{logged_step(workdir, since):4d}, exit {rc}", flush=True)
            continue
        if rc != 0:
            raise SystemExit(f"the interrupted run failed on its own (exit {rc}); see {log.name}")
        if kind is not None:   # the run ended before the drawn point came (a save faster than the poll)
            print(f"  (a {kind} point did not come: the run completed after {len(events)} interruptions)")
        return events


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "kill_resume"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    rng = random.Random(args.seed)
    ref_dir, int_dir = os.path.join(args.workdir, "uninterrupted"), os.path.join(args.workdir, "interrupted")
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    log_path = os.path.join(args.workdir, "runs.log")
    with open(log_path, "w") as log:
        t0 = time.time()
        print("uninterrupted run ...", flush=True)
        subprocess.run(command(ref_dir, args.config, extra), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
        t_ref = time.time() - t0
        ref = losses(ref_dir)
        total = max(ref)
        shutil.copytree(os.path.join(ref_dir, "assets"), os.path.join(int_dir, "assets"))   # same generated inputs
        every = _every_steps(args.config, extra)
        print(f"interrupted run ({args.kills} interruptions) ...", flush=True)
        t0 = time.time()
        events = interrupted_run(int_dir, args.config, extra, args.kills, rng, total, every, log)
        t_int = time.time() - t0
    got = losses(int_dir)
    differ = {s: (ref[s], got.get(s)) for s in ref if got.get(s) != ref[s]}
    result = {
        "config": args.config, "extra": extra, "steps": total, "interruptions": events,
        "kinds": {k: sum(e["kind"] == k for e in events) for k in KINDS},
        "steps_with_other_losses": len(differ), "first_difference": (sorted(differ.items())[:1] or None),
        "export_identical": export_digest(ref_dir) == export_digest(int_dir),
        "accuracy": [accuracy(ref_dir), accuracy(int_dir)],
        "wall_s": {"uninterrupted": round(t_ref, 1), "interrupted": round(t_int, 1)},
    }
    print()
    print("| run | steps | interruptions | losses equal at every step | HF export | held-out accuracy | wall |")
    print("|---|---|---|---|---|---|---|")
    print(f"| uninterrupted | {total} | 0 | - | - | {result['accuracy'][0]} | {t_ref:.0f} s |")
    kinds = ", ".join(f"{v} {k}" for k, v in result["kinds"].items())
    print(f"| interrupted | {max(got)} | {len(events)} ({kinds}) | {'yes' if not differ else f'no ({len(differ)} differ)'}"
          f" | {'byte-identical' if result['export_identical'] else 'DIFFERENT'} | {result['accuracy'][1]} "
          f"| {t_int:.0f} s |")
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "kill_resume.json"), "w") as f:
        json.dump(result, f, indent=1)
    ok = not differ and result["export_identical"] and result["accuracy"][0] == result["accuracy"][1]
    sys.exit(0 if ok else 1)


def _every_steps(config: str, extra: list[str]) -> int:
    """checkpoint.every_steps of the run (the config file, then the overrides)."""
    for a in extra:
        if a.startswith("--config.checkpoint.every_steps="):
            return int(a.split("=", 1)[1])
    sys.path.insert(0, REPO)
    from mmjax.config import sibling_config
    return int(sibling_config(os.path.join(REPO, config), os.path.splitext(os.path.basename(config))[0])
               .checkpoint.every_steps)


if __name__ == "__main__":
    main()
