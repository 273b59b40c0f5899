"""Activation channels between neighbouring stages (see base.py for the seam)."""

from __future__ import annotations

import torch
from mpi4py import MPI

from ppruntime.comm.channels.base import (
    CHANNEL_ENV,
    CHANNEL_NAMES,
    ActivationChannel,
    InputBuffer,
)
from ppruntime.comm.channels.choice import RankDevice, choose_channel, describe_pairs
from ppruntime.comm.waiting import WaitTracker

__all__ = [
    "CHANNEL_ENV",
    "CHANNEL_NAMES",
    "ActivationChannel",
    "RankDevice",
    "choose_channel",
    "describe_pairs",
    "make_channel",
]


def make_channel(
    name: str,
    comm: MPI.Comm,
    tag: int,
    num_slots: int,
    max_elements: int,
    dtype: torch.dtype,
    device: torch.device,
    input_buffer: InputBuffer,
    tracker: WaitTracker | None = None,
) -> ActivationChannel:
    """This rank's end of channel `name` (already chosen by choose_channel).

    comm: the pipeline communicator (its ranks are the stages); for gloo and nccl the
    torch.distributed group must have been initialized (process_group.py).
    tracker: the main thread's; its waits then post ready sends between polls."""
    rank, size = comm.Get_rank(), comm.Get_size()
    prev_rank = rank - 1 if rank > 0 else None
    next_rank = rank + 1 if rank + 1 < size else None
    if name == "host":
        from ppruntime.comm.channels.host import HostChannel

        return HostChannel(
            comm,
            rank,
            prev_rank,
            next_rank,
            tag,
            num_slots,
            max_elements,
            dtype,
            device,
            input_buffer,
            tracker,
        )
    if name in ("gloo", "nccl"):
        from ppruntime.comm.channels.torch_p2p import TorchP2PChannel

        return TorchP2PChannel(
            name, rank, prev_rank, next_rank, max_elements, dtype, device, input_buffer
        )
    if name == "cuda-aware-mpi":
        from ppruntime.comm.channels.cuda_aware import CudaAwareMPIChannel

        channel = CudaAwareMPIChannel(
            comm, rank, prev_rank, next_rank, tag, max_elements, dtype, device, input_buffer
        )
        if tracker is not None:
            tracker.on_poll = channel.progress
        return channel
    raise ValueError(f"unknown activation channel {name!r}; one of {', '.join(CHANNEL_NAMES)}")
