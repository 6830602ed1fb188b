"""One process of a multi-process training run on 127.0.0.1 (gloo collectives on the CPU).

    python tests/multihost_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR RESULT_JSON KEY=VALUE...

Every process runs ``mmjax.train.run.train`` on the same config (KEY=VALUE: flattened config
overrides of configs/tiny.py, values parsed as JSON where they parse) and the same workdir (a
shared file system), with ``data.shard_mode='rows'`` so the global batches equal a one-process
run's. Process 0 writes the export; each process writes its summary to RESULT_JSON.<id>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv):
    port, nproc, pid, workdir, result = argv[1], int(argv[2]), int(argv[3]), argv[4], argv[5]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

    from mmjax.config import sibling_config
    from mmjax.train.run import train

    cfg = sibling_config(str(REPO / "configs" / "tiny.py"), "tiny")
    overrides = {}
    for kv in argv[6:]:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    overrides.setdefault("data.shard_mode", "rows")
    cfg.update_from_flattened_dict(overrides)
    out = train(cfg, workdir)
    out["process_index"], out["process_count"] = jax.process_index(), jax.process_count()
    Path(f"{result}.{pid}").write_text(json.dumps(out))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
