"""Joining a multi-process run: ``jax.distributed.initialize``, from explicit flags or a detected cluster.

One process per host (TPU VM worker, SLURM task, or a local process on the CPU) runs the same
command; they meet at the coordinator before JAX touches a device. Explicit
``coordinator`` / ``num_processes`` / ``process_id`` win; otherwise a cluster JAX can describe
itself (SLURM with several tasks, Open MPI with several ranks, a TPU pod slice with several
workers, or ``auto=True``) is joined with JAX's own detection; otherwise the run is one process.
"""

from __future__ import annotations

import os

from mmjax.errors import UserError


class ClusterError(UserError, ValueError):
    """The multi-process flags do not describe a run (one-line message)."""


def detected_cluster(environ=None) -> str | None:
    """The multi-process launcher this process runs under, when it started several processes."""
    env = os.environ if environ is None else environ

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if "SLURM_JOB_ID" in env and count("SLURM_NTASKS") > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "open mpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu pod slice"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False, environ=None) -> str | None:
    """Join the run; returns a line saying how (None: a single process, nothing joined)."""
    import jax
    explicit = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(explicit):
        if not all(explicit):
            raise ClusterError("--coordinator, --num_processes and --process_id go together (all three, or "
                               "none to let a TPU pod slice or SLURM say them)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ClusterError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
        if ":" not in coordinator:
            raise ClusterError(f"--coordinator={coordinator!r} must be host:port (process 0's address)")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return f"process {process_id} of {num_processes} (coordinator {coordinator})"
    how = detected_cluster(environ) or ("requested" if auto else None)
    if how is None:
        return None
    _cpu_collectives()
    jax.distributed.initialize()
    return f"process {jax.process_index()} of {jax.process_count()} ({how})"


def _cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo (no effect on GPU / TPU devices)."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
