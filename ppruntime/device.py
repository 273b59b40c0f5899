"""Which device a rank computes on."""

from __future__ import annotations

import os

import torch


def select_device(local_rank: int, requested: str | None = None) -> torch.device:
    """`requested` ('cpu', 'cuda', 'cuda:N') or, by default, one GPU per local rank.

    PPRUNTIME_DEVICE overrides the default. Several ranks may share one GPU: their
    activations travel through host memory (MPI buffers are host buffers).
    """
    requested = requested or os.environ.get("PPRUNTIME_DEVICE") or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no GPU; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(requested)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
