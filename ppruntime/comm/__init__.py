"""Communication: MPI bootstrap, communicators by role, tags, waiting, failures.

The names below are imported on first use: importing a submodule (e.g.
`ppruntime.comm.launcher`, `ppruntime.comm.mpirun`) must not initialize MPI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppruntime.lazy_names import lazy_getattr

if TYPE_CHECKING:
    from ppruntime.comm.communicators import PipelineComms, current_thread_comm, thread_comm
    from ppruntime.comm.mpi_env import (
        MPIConfigurationError,
        RankInfo,
        check_world_size,
        init_mpi,
        require_thread_multiple,
    )
    from ppruntime.comm.tags import Tag

_LAZY = {
    "MPIConfigurationError": "ppruntime.comm.mpi_env",
    "PipelineComms": "ppruntime.comm.communicators",
    "RankInfo": "ppruntime.comm.mpi_env",
    "Tag": "ppruntime.comm.tags",
    "check_world_size": "ppruntime.comm.mpi_env",
    "current_thread_comm": "ppruntime.comm.communicators",
    "init_mpi": "ppruntime.comm.mpi_env",
    "require_thread_multiple": "ppruntime.comm.mpi_env",
    "thread_comm": "ppruntime.comm.communicators",
}

__all__ = [
    "MPIConfigurationError",
    "PipelineComms",
    "RankInfo",
    "Tag",
    "check_world_size",
    "current_thread_comm",
    "init_mpi",
    "require_thread_multiple",
    "thread_comm",
]


__getattr__ = lazy_getattr(__name__, _LAZY)
