"""What every rank runs first: MPI, failure hooks, logging, torch threads."""

from __future__ import annotations

import os

from ppruntime.comm.failure import install_abort_on_error
from ppruntime.comm.mpi_env import RankInfo, init_mpi
from ppruntime.logs import setup_logging


def bootstrap(
    log_level: str | None = None,
    log_dir: str | None = None,
    abort_on_error: bool = True,
) -> RankInfo:
    """Initialize MPI and the process-wide hooks for this rank (idempotent).

    Sets torch to one thread per rank unless PPRUNTIME_TORCH_THREADS or
    OMP_NUM_THREADS says otherwise: ranks share the machine's cores.
    """
    info = init_mpi()
    if abort_on_error:
        install_abort_on_error(info)
    setup_logging(info, log_level, log_dir)
    import torch

    threads = os.environ.get("PPRUNTIME_TORCH_THREADS") or os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads else 1)
    return info
