"""A torch.distributed process group bootstrapped from MPI (no extra launcher).

Rank 0 picks a free TCP port on its host's address and broadcasts address and
port over MPI; every rank then joins with init_method tcp://address:port, its MPI
rank and the MPI world size. Created once, in the main thread, at start-up.
"""

from __future__ import annotations

import datetime
import os
import socket

from mpi4py import MPI

from ppruntime.logs import get_logger

log = get_logger("channels")


ADDRESS_ENV = "PPRUNTIME_CHANNEL_ADDRESS"


def _host_address(multi_host: bool) -> str:
    """An address of this host the other ranks can reach: PPRUNTIME_CHANNEL_ADDRESS, else
    the host name's address; a loopback one only if every rank runs on this host (else
    the address of the interface of the default route)."""
    override = os.environ.get(ADDRESS_ENV)
    if override:
        return override
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    if address.startswith("127.") and multi_host:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(("10.255.255.255", 1))  # UDP: picks a route, sends nothing
                address = probe.getsockname()[0]
            except OSError:
                pass
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
    multi_host = len(set(comm.allgather(socket.gethostname()))) > 1
    endpoint = None
    if rank == 0:
        address = _host_address(multi_host)
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
