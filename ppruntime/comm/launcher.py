"""What the launcher (mpirun, srun) tells each process in its environment, read
without initializing MPI: the CLI reports bad arguments before MPI starts."""

from __future__ import annotations

import os

# Launcher variables that announce how many ranks the job was meant to have.
LAUNCHER_SIZE_VARIABLES = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS",
)
# ... and this process's rank in it.
LAUNCHER_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def _first_count(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return None


def launcher_world_size() -> int | None:
    """Ranks the launcher announced, or None when no launcher variable is set."""
    return _first_count(LAUNCHER_SIZE_VARIABLES)


def launcher_rank() -> int:
    """This process's rank as the launcher announced it; 0 when started alone."""
    return _first_count(LAUNCHER_RANK_VARIABLES) or 0


def started_alone() -> bool:
    """No launcher variable says there are other ranks (a plain `ppruntime ...`, or
    `mpirun -n 1`)."""
    size = launcher_world_size()
    if size is not None:
        return size == 1
    return not any(os.environ.get(name) for name in LAUNCHER_RANK_VARIABLES)
