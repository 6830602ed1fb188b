"""``python -m mmjax.plan --config=configs/<name>.py [--config.mesh.fsdp=8] [--device=a100-80g]``

The memory a config's train step needs on each device, before any weight is read or any
accelerator is reserved: the step ``python -m mmjax.train`` would run (same model, mesh, rules,
remat, trainable split, optimizer, batch shapes) is compiled ahead of time on abstract inputs
(``build_run(abstract=True)``, ``lower().compile()``) and its buffers are summed per device.

* Parameters, optimizer state and the batch: exact, from their shapes, dtypes and shardings.
* Activations and temporaries: XLA's buffer plan of the compiled step, for the devices it was
  compiled for: the local accelerators when there are enough of them, else simulated CPU devices
  (XLA:CPU plans its own fusions and upcasts bf16 matmul operands to float32, so its temporaries
  overstate a GPU's or TPU's). The output names which.

The model's shapes come from ``model_path``/config.json when it exists (only that file is read),
else from the seed checkpoints' known configs (``mmjax.models.catalog``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from mmjax.errors import UserError

GiB = 2 ** 30
# the memory a process can use on one device of each kind, and why that figure
DEVICES = {
    "a100-80g": (80 * GiB, "A100 80GB (81920 MiB)"),
    "h100-80g": (80 * GiB, "H100 80GB SXM (81559 MiB usable; 80 GiB here)"),
    "h200": (140 * GiB, "H200 141GB (143771 MiB)"),
    "v5p": (95 * GiB, "TPU v5p chip, 95 GiB HBM"),
    "v6e": (32 * GiB, "TPU v6e chip, 32 GiB HBM"),
}
HEADROOM = 0.90   # share of a device's memory a plan may fill (allocator fragmentation, runtime workspaces)



class PlanError(UserError, ValueError):
    """The plan cannot be made (one-line message)."""


def model_config(cfg) -> tuple[dict | None, str]:
    """(the checkpoint's config.json as a dict, where it came from); None for the embedded default."""
    if cfg.synthetic.enabled:
        return None, "the embedded default (generated)"
    path = os.path.join(cfg.model_path, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f), path
    from mmjax.models.catalog import CHECKPOINTS, known_checkpoint
    known = known_checkpoint(cfg.model_path)
    if known is None:
        raise PlanError(f"{path} not found and {os.path.basename(os.path.normpath(cfg.model_path))!r} is not a "
                        f"known checkpoint ({', '.join(CHECKPOINTS)}): put the checkpoint's config.json there")
    config, img_context = known
    if cfg.model.img_context_token_id < 0:
        with cfg.unlocked():
            cfg.model.img_context_token_id = img_context
    return config, f"the known shapes of {os.path.basename(os.path.normpath(cfg.model_path))}"


def _devices_for(n: int):
    """(devices, words): ``n`` local accelerators when there are that many, else ``n`` CPU devices."""
    import jax
    try:
        local = jax.devices()
    except RuntimeError:
        local = []
    if local and local[0].platform != "cpu" and len(local) >= n:
        return local[:n], f"{n} x {local[0].device_kind} (this machine's)"
    cpus = jax.devices("cpu")
    if len(cpus) < n:
        raise PlanError(f"the mesh needs {n} devices but only {len(cpus)} CPU devices could be made "
                        "(JAX started before the planner could set their number)")
    return cpus[:n], (f"{n} simulated CPU devices (XLA:CPU's buffer plan: its temporaries overstate a GPU's "
                      "or TPU's)")


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def make_plan(cfg) -> dict:
    """Compile ``cfg``'s train step on abstract inputs; per-device bytes by kind, and fits."""
    import jax

    from mmjax.train.setup import ConfigError, build_run

    n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    hf_config, source = model_config(cfg)
    devices, where = _devices_for(n)
    if cfg.total_steps <= 0:   # the schedule's length changes no buffer
        with cfg.unlocked():
            cfg.total_steps = 1000
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmjax_plan_") as tmp:
        try:
            run = build_run(cfg, devices, abstract=True, hf_config=hf_config, with_data=False,
                            workdir=tmp if cfg.synthetic.enabled else None)
        except ConfigError as e:
            raise PlanError(str(e)) from None
        compiled = run.lower().compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    state = run.state
    parts = {
        "trainable parameters": _per_device_bytes(state.params),
        "frozen parameters": _per_device_bytes(run.frozen),
        "optimizer state": _per_device_bytes(state.opt_state),
        "batch": _per_device_bytes(run.batch_spec()),
    }
    parts["other state"] = max(arg - sum(parts.values()), 0)   # rng, counters, non-parameter variables
    parts["activations + temporaries"] = temp
    total = arg + out - alias + temp   # the donated state's outputs reuse its buffers (alias)
    dtypes = {"trainable": cfg.model.param_dtype, "frozen": cfg.model.frozen_param_dtype, "compute": cfg.model.dtype}
    fits = {kind: {"memory": cap, "fits": total <= HEADROOM * cap, "share": total / cap}
            for kind, (cap, _) in DEVICES.items()}
    return {"config": cfg.name, "model": source, "mesh": dict(run.mesh.shape), "compiled_for": where,
            "jax": jax.__version__, "dtypes": dtypes, "remat": cfg.model.remat,
            "batch": {"rows": int(cfg.data.batch_size), "grad_accum": int(cfg.grad_accum),
                      "tokens_per_row": int(cfg.data.pack_max_length if cfg.data.packing != "none"
                                            else cfg.data.max_length),
                      "tiles_per_row": int(cfg.data.max_tiles_per_pack)},
            "per_device_bytes": parts, "total_bytes": total, "xla": {"argument": arg, "output": out, "alias": alias,
                                                                    "temp": temp},
            "compile_s": round(compile_s, 1), "fits": fits}


def format_plan(plan: dict, device: str | None = None) -> str:
    b = plan["batch"]
    unit, size = ("GiB", GiB) if plan["total_bytes"] >= GiB else ("MiB", 2 ** 20)
    lines = [f"plan for {plan['config']}: {plan['model']}",
             f"  mesh {plan['mesh']}, compiled for {plan['compiled_for']} in {plan['compile_s']} s",
             f"  global batch {b['rows']} rows x {b['tokens_per_row']} tokens, {b['tiles_per_row']} tile slots a row, "
             f"grad_accum {b['grad_accum']}; remat {plan['remat']}; trainable {plan['dtypes']['trainable']}, "
             f"frozen {plan['dtypes']['frozen']}, compute {plan['dtypes']['compute']}",
             "", f"  {'per device':<28} {unit:>9}"]
    for name, nbytes in plan["per_device_bytes"].items():
        lines.append(f"  {name:<28} {nbytes / size:9.2f}")
    lines.append(f"  {'total (peak estimate)':<28} {plan['total_bytes'] / size:9.2f}")
    lines += ["", f"  {'device':<10} {'GiB':>6}  fits (<= {HEADROOM:.0%} of its memory)"]
    for kind, f in plan["fits"].items():
        if device is None or kind == device:
            lines.append(f"  {kind:<10} {f['memory'] / GiB:6.0f}  {'yes' if f['fits'] else 'NO '} "
                         f"({f['share']:.0%})   {DEVICES[kind][1]}")
    return "\n".join(lines)


def _define_flags():
    """The command line (defined only when run as a program: importing the planner adds no flags)."""
    global _CONFIG, _DEVICE, _JSON
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.", lock_config=True)
    _DEVICE = flags.DEFINE_string("device", None, f"Judge the fit on one device kind ({', '.join(DEVICES)}); "
                                  "default: every kind.")
    _JSON = flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")


def main(argv):
    del argv
    from absl import logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # JAX's backend probing lines
    from mmjax.errors import config_or_exit
    cfg = config_or_exit(_CONFIG)
    if _DEVICE.value is not None and _DEVICE.value not in DEVICES:
        print(f"error: --device={_DEVICE.value}: choose one of {', '.join(DEVICES)}", file=sys.stderr)
        sys.exit(2)
    import jax
    n = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    try:   # CPU devices for the mesh, unless the backend already started (then what it has)
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:
        pass
    from mmjax.errors import exit_on_expected
    plan = exit_on_expected(make_plan, cfg)
    print(format_plan(plan, _DEVICE.value))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(plan, f, indent=2)


if __name__ == "__main__":
    from mmjax.errors import parse_flags_or_exit
    _define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
