"""Which activation channel a pipeline uses (pure: from facts every rank gathered).

auto: nccl when every pair of neighbouring ranks computes on different GPUs (NCCL
refuses two ranks on one GPU), host otherwise (ranks sharing a GPU, and CPU).
One channel serves the whole pipeline (nccl and gloo need one process group).
"""

from __future__ import annotations

from dataclasses import dataclass

from ppruntime.config import ACTIVATION_CHANNELS, ConfigError

FLAG = "--activation-channel / PPRUNTIME_ACTIVATION_CHANNEL / LLM(activation_channel=...)"


@dataclass(frozen=True)
class RankDevice:
    """What a rank computes on, as the channel choice needs it."""

    rank: int
    host: str
    device_type: str  # "cpu" or "cuda"
    device_id: str  # a GPU's identity on its host ("" on CPU)
    cuda_aware_mpi: str  # "yes", "no" or "unknown" (comm.mpi_env.cuda_aware_mpi)

    @property
    def gpu(self) -> tuple[str, str] | None:
        return (self.host, self.device_id) if self.device_type == "cuda" else None


def pair_channel(upstream: RankDevice, downstream: RankDevice) -> str:
    """What `auto` picks for one neighbouring pair."""
    if upstream.gpu is not None and downstream.gpu is not None and upstream.gpu != downstream.gpu:
        return "nccl"
    return "host"


def choose_channel(requested: str, ranks: list[RankDevice]) -> str:
    """The pipeline's channel for `requested` (one of base.CHANNEL_NAMES); ConfigError
    (the same on every rank) when the ranks cannot use it."""
    if requested not in ACTIVATION_CHANNELS:
        raise ConfigError(
            f"activation channel must be one of {', '.join(ACTIVATION_CHANNELS)} ({FLAG}), "
            f"got {requested!r}"
        )
    pairs = list(zip(ranks, ranks[1:]))
    if requested == "auto":
        if pairs and all(pair_channel(a, b) == "nccl" for a, b in pairs):
            return "nccl"
        return "host"
    on_cuda = [r.rank for r in ranks if r.device_type == "cuda"]
    on_cpu = [r.rank for r in ranks if r.device_type != "cuda"]
    if requested == "nccl":
        if on_cpu:
            raise ConfigError(
                f"activation channel 'nccl' needs a CUDA device on every rank, but rank(s) "
                f"{on_cpu} compute on the CPU ({FLAG}): use 'gloo' or 'host' on CPU"
            )
        shared = [(a.rank, b.rank) for a, b in pairs if a.gpu == b.gpu]
        if shared:
            raise ConfigError(
                f"activation channel 'nccl' cannot connect ranks sharing one GPU (NCCL refuses "
                f"it): pairs {shared} ({FLAG}): use 'host' or give each rank its own GPU"
            )
    elif requested == "gloo":
        if on_cuda:
            raise ConfigError(
                f"activation channel 'gloo' moves CPU tensors, but rank(s) {on_cuda} compute "
                f"on CUDA ({FLAG}): use 'nccl', 'host' or 'auto' there"
            )
    elif requested == "cuda-aware-mpi":
        lacking = [r.rank for r in ranks if r.cuda_aware_mpi != "yes"]
        if on_cpu or lacking:
            reports = sorted({r.cuda_aware_mpi for r in ranks})
            raise ConfigError(
                f"activation channel 'cuda-aware-mpi' needs CUDA devices and an MPI library "
                f"reporting CUDA support on every rank; CPU rank(s): {on_cpu}, ranks whose MPI "
                f"does not report CUDA support: {lacking} (reported: {', '.join(reports)}) "
                f"({FLAG}): use 'host' (or 'nccl' across GPUs) instead"
            )
    return requested


def describe_pairs(ranks: list[RankDevice]) -> list[str]:
    """`ppruntime info`: what `auto` would use between each pair of neighbours."""
    return [
        f"rank {a.rank} -> rank {b.rank}: {pair_channel(a, b)}" for a, b in zip(ranks, ranks[1:])
    ]
