"""`ppruntime info`: what MPI, threads, hosts and devices this job sees."""

from __future__ import annotations

import json
import os

from mpi4py import MPI

from ppruntime.comm.mpi_env import (
    THREAD_LEVEL_NAMES,
    RankInfo,
    cuda_aware_mpi,
    launcher_mismatch_warning,
    mpi_library_version,
)
from ppruntime.device import describe_device, select_device


def gather_job_info(info: RankInfo) -> list[dict] | None:
    """Every rank describes itself; rank 0 gets the list, others None."""
    import mpi4py
    import torch

    try:
        selected = select_device(info.local_rank)
        device = describe_device(selected)
        device_type = selected.type
        device_id = str(selected.index if selected.index is not None else 0)
    except ValueError as error:  # a bad PPRUNTIME_DEVICE: say so, in the rank's line
        device, device_type, device_id = f"none ({error})", "none", ""
    mine = {
        "rank": info.rank,
        "host": info.host,
        "local_rank": info.local_rank,
        "local_size": info.local_size,
        "device": device,
        "device_type": device_type,
        "device_id": device_id,
        "cuda_aware_mpi": cuda_aware_mpi() if device_type == "cuda" else "no",
        "pid": os.getpid(),
        "torch": torch.__version__,
        "mpi4py": mpi4py.__version__,
    }
    return MPI.COMM_WORLD.gather(mine, root=0)


def format_job_info(info: RankInfo, ranks: list[dict], as_json: bool = False) -> str:
    summary = {
        "mpi_library": mpi_library_version(),
        "world_size": info.size,
        "thread_level_requested": THREAD_LEVEL_NAMES[info.thread_level_requested],
        "thread_level_granted": THREAD_LEVEL_NAMES.get(
            info.thread_level_provided, str(info.thread_level_provided)
        ),
        "cuda_aware_mpi": cuda_aware_mpi(),
        "torch": ranks[0]["torch"],
        "mpi4py": ranks[0]["mpi4py"],
        "ranks": ranks,
    }
    summary["activation_channels"] = _activation_channels(ranks)
    warning = launcher_mismatch_warning(info)
    if warning:
        summary["warning"] = warning
    if as_json:
        return json.dumps(summary)
    lines = [
        f"MPI library:      {summary['mpi_library']}",
        f"world size:       {summary['world_size']}",
        f"thread level:     requested {summary['thread_level_requested']}, "
        f"granted {summary['thread_level_granted']}",
        f"CUDA-aware MPI:   {summary['cuda_aware_mpi']}",
        f"torch:            {summary['torch']}",
        f"mpi4py:           {summary['mpi4py']}",
        "ranks:",
    ]
    for rank in ranks:
        lines.append(
            f"  rank {rank['rank']}: host {rank['host']} local_rank {rank['local_rank']}"
            f"/{rank['local_size']} device {rank['device']} pid {rank['pid']}"
        )
    channels = summary["activation_channels"]
    lines.append(f"activation channel: {channels['chosen']} (requested {channels['requested']})")
    lines += [f"  {pair}" for pair in channels["pairs_auto"]]
    if warning:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def _activation_channels(ranks: list[dict]) -> dict:
    """What `auto` would use between each pair of neighbours, and what the job's
    PPRUNTIME_ACTIVATION_CHANNEL would give (or why it would be refused)."""
    from ppruntime.comm.channels.choice import RankDevice, choose_channel, describe_pairs
    from ppruntime.config import ConfigError

    devices = [
        RankDevice(r["rank"], r["host"], r["device_type"], r["device_id"], r["cuda_aware_mpi"])
        for r in ranks
    ]
    requested = os.environ.get("PPRUNTIME_ACTIVATION_CHANNEL") or "auto"
    try:
        chosen = choose_channel(requested, devices) if len(devices) > 1 else "none (one rank)"
    except ConfigError as refused:
        chosen = f"refused: {refused}"
    return {"requested": requested, "chosen": chosen, "pairs_auto": describe_pairs(devices)}
