"""Communication: MPI bootstrap, communicators by role, tags, waiting, failures."""

from ppruntime.comm.communicators import PipelineComms, current_thread_comm, thread_comm
from ppruntime.comm.mpi_env import (
    MPIConfigurationError,
    RankInfo,
    check_world_size,
    init_mpi,
    require_thread_multiple,
)
from ppruntime.comm.tags import Tag

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
