"""What every rank runs first: MPI, failure hooks, logging, torch threads."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ppruntime.config import ConfigError, env_positive_int

if TYPE_CHECKING:  # MPI and torch are imported by bootstrap(), not by importing this
    from ppruntime.comm.mpi_env import RankInfo


def bootstrap(
    log_level: str | None = None,
    log_dir: str | None = None,
    abort_on_error: bool = True,
) -> RankInfo:
    """Initialize MPI and the process-wide hooks for this rank (idempotent).

    Sets torch to one thread per rank unless PPRUNTIME_TORCH_THREADS or
    OMP_NUM_THREADS says otherwise: ranks share the machine's cores. A bad log level,
    log directory or thread count raises ConfigError (MPI is initialized by then).
    """
    from ppruntime.comm.failure import install_abort_on_error
    from ppruntime.comm.mpi_env import init_mpi
    from ppruntime.logs import setup_logging

    info = init_mpi()
    if abort_on_error:
        install_abort_on_error(info)
    threads = torch_threads()
    setup_logging(info, log_level, log_dir)
    import torch

    torch.set_num_threads(threads)
    return info


def torch_threads() -> int:
    """PPRUNTIME_TORCH_THREADS, else the first field of OMP_NUM_THREADS ("4,2" is
    OpenMP's nested form), else 1; a value that is not a positive integer is a
    ConfigError naming the variable."""
    threads = env_positive_int("PPRUNTIME_TORCH_THREADS")
    if threads is not None:
        return threads
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not omp:
        return 1
    if not omp.isdigit() or int(omp) < 1:
        raise ConfigError(
            f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']!r} must be a positive integer "
            "(or set PPRUNTIME_TORCH_THREADS)"
        )
    return int(omp)
