"""``python -m mmjax.train --config=configs/<name>.py [--config.key=value] [--workdir=DIR]``"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, exports). "
                               "Default: workdirs/<config name>.")


def main(argv):
    del argv
    from absl import logging

    from mmjax.data.samples import SkipBudgetExceeded
    from mmjax.train.run import train
    from mmjax.train.setup import ConfigError
    from mmjax.weights import CheckpointError

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # orbax / grain INFO lines drown the progress line
    cfg = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdirs", cfg.name)
    try:
        train(cfg, workdir)
    except (ConfigError, CheckpointError, SkipBudgetExceeded) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
