"""Which device a rank computes on."""

from __future__ import annotations

import os

import torch

from ppruntime.config import ConfigError, check_device_name


def select_device(local_rank: int, requested: str | None = None) -> torch.device:
    """`requested` ('cpu', 'cuda', 'cuda:N') or, by default, one GPU per local rank.

    PPRUNTIME_DEVICE overrides the default. Several ranks may share one GPU: their
    activations travel through host memory (MPI buffers are host buffers). A CUDA
    device becomes this process's current one (streams, graphs and events use it).
    """
    device = _requested_device(local_rank, requested)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _requested_device(local_rank: int, requested: str | None) -> torch.device:
    if requested:
        check_device_name(requested)
    else:
        requested = os.environ.get("PPRUNTIME_DEVICE") or "auto"
        check_device_name(requested, "PPRUNTIME_DEVICE")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but torch sees no GPU; use --device cpu")
    count = torch.cuda.device_count()
    if requested == "cuda":
        return torch.device("cuda", local_rank % count)
    index = int(requested.split(":")[1])
    if index >= count:
        raise ConfigError(f"device {requested!r} requested but torch sees only {count} GPU(s)")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def configure_determinism(device: torch.device, deterministic: bool) -> None:
    """Deterministic mode on CUDA: the same inputs give bitwise-identical outputs.

    On one GPU, kernels of a given shape are already run-to-run reproducible unless
    they reduce with atomics or pick algorithms at run time. So, for this process:
    cuBLAS gets a fixed workspace per stream (CUBLAS_WORKSPACE_CONFIG; without it
    cuBLAS may choose reductions that differ between runs when several streams are
    in use, and it must be set before the first cuBLAS call), torch uses its
    deterministic implementations (index_put_/index_copy_ without atomic scatter;
    warn_only: an op without one warns instead of failing), cuDNN autotuning is off,
    and torch's NaN fill of fresh memory (a cost per allocation) stays off. Batch
    composition is fixed by deterministic mode itself (fixed microbatches), so the
    kernels' shapes, split counts and reduction orders repeat run after run.
    """
    if not deterministic or device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (host: MemAvailable); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
