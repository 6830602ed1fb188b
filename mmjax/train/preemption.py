"""Stopping a run on a signal without losing work: SIGTERM (a scheduler's preemption notice, SLURM
``--signal``, a TPU VM's maintenance event) and SIGINT (Ctrl-C) ask the loop to finish the step in
flight, write a checkpoint of that step (train state + data-iterator state) and exit with
``EXIT_PREEMPTED``; rerunning the same command resumes from it bit for bit. A second Ctrl-C stops at
once (KeyboardInterrupt; the previous checkpoint stays intact, as after a kill).

On several processes every process must stop after the same step: each step they agree (a tiny
host all-gather of "did any of us get a signal"), and JAX's own preemption notice
(``multihost_utils.reached_preemption_sync_point``, where the coordination service has one) counts
as a signal too.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: "try again", the exit status schedulers requeue on
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint of ``step``."""

    def __init__(self, signame: str, step: int, directory: str):
        super().__init__(f"stopped by {signame} after step {step}: checkpoint {directory}/{step} saved; "
                         f"run the same command again to resume")
        self.signame, self.step, self.directory = signame, step, directory


class StopRequest:
    """A context that turns SIGTERM / SIGINT into a request the training loop polls (main thread only;
    elsewhere it installs nothing and never asks to stop)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now
        if self.signum is None:
            print(f"\nreceived {signal.Signals(signum).name}: finishing the step in flight, then saving a checkpoint",
                  file=sys.stderr, flush=True)
        self.signum = signum

    @property
    def signame(self) -> str:
        return "a preemption notice" if self.signum is None else signal.Signals(self.signum).name

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step`` (the same answer on every process)."""
        import jax
        local = self.signum is not None
        if jax.process_count() == 1:
            return local
        import numpy as np
        from jax.experimental import multihost_utils
        try:
            local = local or bool(multihost_utils.reached_preemption_sync_point(step))
        except Exception:   # no preemption service in this cluster setup: the signals alone decide
            pass
        return bool(np.any(multihost_utils.process_allgather(np.asarray([local], np.int32))))
