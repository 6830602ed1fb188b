"""Settings for the whole test session.

XLA's CPU backend optimisation is off: the tests compile many small programs and run each for a
few steps, so compile time dominates (measured on 2 cores: tests/test_train.py 4 min 54 s with it
off, ~6 min 50 s on). The arithmetic is the same IEEE float32 at every level (XLA:CPU never uses
fast-math), and subprocesses inherit the setting. A level given in XLA_FLAGS is kept.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
