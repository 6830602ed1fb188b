"""``python -m mmjax.train --config=configs/<name>.py [--config.key=value] [--workdir=DIR]``

Several processes (one per host): ``--coordinator=HOST:PORT --num_processes=N --process_id=I`` on
each, or nothing under SLURM / Open MPI, ``--multihost`` on a TPU pod slice (``scripts/`` has
the launch recipes)."""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports). "
                               "Default: workdirs/<config name>.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "Multi-process run: host:port of process 0 (with "
                                   "--num_processes and --process_id; not needed on a TPU pod slice or under SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join a multi-process run JAX detects itself (TPU pod "
                               "slice workers; SLURM and Open MPI are detected without it).")


def main(argv):
    del argv
    from absl import logging

    from mmjax.errors import config_or_exit, exit_on_expected
    from mmjax.train import cluster

    joined = exit_on_expected(cluster.initialize, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                              auto=_MULTIHOST.value)   # before anything touches a JAX device
    if joined:
        print(f"multi-process run: {joined}", flush=True)

    from mmjax.train.preemption import EXIT_PREEMPTED, Preempted
    from mmjax.train.run import train

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # orbax / grain INFO lines drown the progress line
    cfg = config_or_exit(_CONFIG)
    workdir = _WORKDIR.value or os.path.join("workdirs", cfg.name)
    try:
        exit_on_expected(train, cfg, workdir)   # bad input: one line on stderr, exit 2; a bug: its traceback
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:   # a second Ctrl-C: no save; the previous checkpoint is whole
        print("interrupted: stopped without saving; the workdir's latest checkpoint is intact",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    from mmjax.errors import parse_flags_or_exit
    app.run(main, flags_parser=parse_flags_or_exit)
