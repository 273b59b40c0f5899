"""A torch.distributed process group bootstrapped from MPI (no extra launcher).

Rank 0 picks a free TCP port on its host's address and broadcasts address and
port over MPI; every rank then joins with init_method tcp://address:port, its MPI
rank and the MPI world size. Created once, in the main thread, at start-up.
"""

from __future__ import annotations

import datetime
import socket

from mpi4py import MPI

from ppruntime.logs import get_logger

log = get_logger("channels")


def _host_address() -> str:
    """An address of this host the other ranks can reach (loopback as a last resort)."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"
    return address


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def init_process_group_from_mpi(comm: MPI.Comm, backend: str, timeout_s: float) -> None:
    """Join the default torch.distributed group (`backend`: "gloo" or "nccl").

    timeout_s bounds the rendezvous (and torch's own collective timeout)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    rank, size = comm.Get_rank(), comm.Get_size()
    endpoint = None
    if rank == 0:
        address = _host_address()
        endpoint = (address, _free_port(address))
    address, port = comm.bcast(endpoint, root=0)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    log.info("rank %d: torch.distributed %s group joined at %s:%d", rank, backend, address, port)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
