"""One config object for the parallel layout, one for the engine.

Both validate at construction; every message says what to change.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

MIN_ASYNC_MICROBATCHES = 4
"""Floor on microbatch slots in async mode (like TensorRT-LLM's
MIN_ASYNC_MICRO_BATCH_NUM): slots only hold send handles, requests bound what is
in flight, so more slots than stages never hurt and keep rank 0 from waiting on a
slot whose sends are still draining."""

DEFAULT_WATCHDOG_TIMEOUT_S = 300.0
DEFAULT_STARTUP_TIMEOUT_S = 600.0
AUTO_PARTITION = "auto"
# programmatic dependent launch of the Triton kernels (kernels/dependent_launch.py)
DEPENDENT_LAUNCH_ENV = "PPRUNTIME_PDL"

ATTENTION_BACKENDS = ("torch", "triton")
"""Attention backends (ppruntime/model/backends); None picks triton on CUDA, torch on CPU."""

ACTIVATION_CHANNELS = ("auto", "nccl", "gloo", "host", "cuda-aware-mpi")
"""How activations travel between neighbouring stages (ppruntime/comm/channels)."""


class ConfigError(ValueError):
    """An engine or parallel-layout setting is invalid."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
INT32_MAX = 2**31 - 1  # block ids travel between ranks as int32
SEED_LIMIT = 2**63


def check_seconds(name: str, flag: str, value: object) -> None:
    """A timeout must be a finite number of seconds above 0 (there is no "off")."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{name} ({flag}) must be a positive, finite number of seconds, got {value!r}; "
            f"0 does not turn it off: to be lenient give a large value such as 86400"
        )


def env_flag(name: str) -> bool | None:
    """A boolean environment variable: None when unset or empty; anything but
    1/true/yes/on or 0/false/no/off (any case) is an error naming the variable."""
    return parse_flag(name, os.environ.get(name))


def parse_flag(name: str, value: str | None) -> bool | None:
    """`value` of the boolean variable `name`, read as env_flag reads it."""
    if value is None or value.strip() == "":
        return None
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(
        f"{name}={value!r} is not a boolean; use one of {', '.join(_TRUE)} "
        f"or {', '.join(_FALSE)} (or leave it unset)"
    )


def env_positive_int(name: str) -> int | None:
    """A positive integer environment variable (None when unset or empty)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")
    return number


def check_writable_file(path: str, what: str) -> None:
    """Fail now, naming `what` and the path, if `path` cannot be written later (a file
    written at the end of a run must not fail after the work is done). Leaves no file
    behind that was not there."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path}: is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as error:
        raise ConfigError(f"{what} {path}: cannot write there ({error.strerror})") from None
    if not existed:
        os.remove(path)


def check_device_name(device: str | None, what: str = "device") -> None:
    """`device` must be None, "auto", "cpu", "cuda" or "cuda:N"."""
    if device is None or device in ("auto", "cpu", "cuda"):
        return
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        return
    raise ConfigError(f"{what} must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is laid out over MPI ranks.

    pp_size: number of pipeline stages = MPI ranks.
    layer_partition: decoder layers per stage, e.g. (3, 5, 5, 3); None = balanced by
        layer count (embedding and LM head counted in); "auto" = balanced by the time
        each rank measures for each piece at start-up (or reads from partition_costs).
    partition_costs: a JSON file of measured per-rank costs (written by `ppruntime
        info --partition-costs FILE`) for "auto" to use instead of measuring.
    partition_decode_fraction: for "auto", the expected share of decode microbatches
        (the rest are prefill chunks of max_num_tokens) that the costs are weighted by.
    partition_decode_context: for "auto", the context length of each sequence of the
        timed decode microbatch (the expected mean context while decoding).
    deterministic: no relay thread; each batch is handled in a fixed iteration and
        num_microbatches = pp_size (PPRUNTIME_DETERMINISTIC=1 sets it too).
    num_microbatches: microbatch slots; None = pp_size (deterministic) or
        max(pp_size, MIN_ASYNC_MICROBATCHES) (async).
    """

    pp_size: int = 1
    layer_partition: tuple[int, ...] | str | None = None
    partition_costs: str | None = None
    partition_decode_fraction: float = 0.9
    partition_decode_context: int = 256
    deterministic: bool = False
    num_microbatches: int | None = None
    watchdog_timeout_s: float = DEFAULT_WATCHDOG_TIMEOUT_S

    def __post_init__(self) -> None:
        if isinstance(self.pp_size, bool) or not isinstance(self.pp_size, int) or self.pp_size < 1:
            raise ConfigError(f"pp_size must be a positive integer, got {self.pp_size!r}")
        if isinstance(self.layer_partition, str) and self.layer_partition != AUTO_PARTITION:
            raise ConfigError(
                f"layer_partition {self.layer_partition!r} is neither {AUTO_PARTITION!r} nor a "
                "sequence of layer counts such as (3, 5, 5, 3)"
            )
        if self.partition_costs is not None and self.layer_partition != AUTO_PARTITION:
            raise ConfigError(
                f"partition_costs={self.partition_costs!r} is only used with "
                "layer_partition='auto' (--layer-partition auto)"
            )
        if (
            isinstance(self.partition_decode_context, bool)
            or not isinstance(self.partition_decode_context, int)
            or self.partition_decode_context < 1
        ):
            raise ConfigError(
                "partition_decode_context must be a positive integer (tokens), got "
                f"{self.partition_decode_context!r}"
            )
        if not 0.0 <= self.partition_decode_fraction <= 1.0:
            raise ConfigError(
                "partition_decode_fraction must be in [0, 1], got "
                f"{self.partition_decode_fraction!r}"
            )
        if self.layer_partition is not None and self.layer_partition != AUTO_PARTITION:
            partition = tuple(self.layer_partition)
            object.__setattr__(self, "layer_partition", partition)
            if len(partition) != self.pp_size:
                raise ConfigError(
                    f"layer_partition {','.join(map(str, partition))} has {len(partition)} "
                    f"stages but pp_size is {self.pp_size}; give one layer count per stage"
                )
        if self.num_microbatches is not None:
            if self.num_microbatches < self.pp_size:
                raise ConfigError(
                    f"num_microbatches={self.num_microbatches} is less than pp_size="
                    f"{self.pp_size}; use at least {self.pp_size} so every stage can be busy"
                )
            if self.deterministic and self.num_microbatches != self.pp_size:
                raise ConfigError(
                    f"deterministic mode uses exactly pp_size={self.pp_size} microbatches; "
                    f"drop num_microbatches={self.num_microbatches} or turn deterministic off"
                )
        check_seconds("watchdog_timeout_s", "--watchdog-timeout", self.watchdog_timeout_s)

    @property
    def microbatch_slots(self) -> int:
        if self.num_microbatches is not None:
            return self.num_microbatches
        if self.deterministic:
            return self.pp_size
        return max(self.pp_size, MIN_ASYNC_MICROBATCHES)


@dataclass(frozen=True)
class EngineConfig:
    """What to run and how much of it at once.

    model: checkpoint directory or preset name ("tiny-trained", "tiny", "bench-small",
        "null"; LLM() and the CLI default to "tiny-trained").
    max_batch_size: most sequences in one microbatch.
    max_num_tokens: token budget of one microbatch (prefill chunks + decode tokens).
    kv_cache_blocks: KV blocks per rank; None = from kv_cache_memory_mb. The blocks
        actually used are the minimum over all ranks.
    attention_backend: "torch" or "triton"; None = triton on CUDA, torch on CPU.
    startup_timeout_s: how long each rank waits for the others to finish start-up
        (loading included) before the job aborts naming the ranks that did not.
    cuda_graphs: replay decode steps from CUDA graphs captured at start-up (CUDA with a
        capturable attention backend only; no effect on CPU). False = --enforce-eager.
    activation_channel: how activations reach the next stage: "auto" (nccl between
        distinct GPUs, host otherwise), "nccl", "gloo" (CPU), "host" (MPI via host
        memory) or "cuda-aware-mpi" (MPI on device buffers, where the MPI supports it).
    async_scheduling: with one pipeline stage, schedule and launch the next decode step
        before the tokens of the step in flight are on the host (the host's work then
        overlaps the device's). None = on where the stage computes on CUDA at pp_size 1
        outside deterministic mode, off elsewhere (`async_scheduling_on`).
    """

    model: str = "tiny"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dtype: str = "auto"
    device: str | None = None
    max_batch_size: int = 64
    max_num_tokens: int = 1024
    block_size: int = 16
    kv_cache_blocks: int | None = None
    kv_cache_memory_mb: int = 256
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str | None = None
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    cuda_graphs: bool = True
    activation_channel: str = "auto"
    async_scheduling: bool | None = None

    def async_scheduling_on(self, device_type: str) -> bool:
        """Whether async scheduling runs for a stage computing on `device_type`."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        parallel = self.parallel
        return device_type == "cuda" and parallel.pp_size == 1 and not parallel.deterministic

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens", "block_size", "kv_cache_memory_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_num_tokens < self.max_batch_size:
            raise ConfigError(
                f"max_num_tokens={self.max_num_tokens} is smaller than max_batch_size="
                f"{self.max_batch_size}; every sequence of a full batch needs one token: "
                f"raise max_num_tokens to at least {self.max_batch_size}"
            )
        if self.kv_cache_blocks is not None and (
            isinstance(self.kv_cache_blocks, bool)
            or not isinstance(self.kv_cache_blocks, int)
            or self.kv_cache_blocks < 1
        ):
            raise ConfigError(
                f"kv_cache_blocks must be a positive integer, got {self.kv_cache_blocks!r}"
            )
        if self.kv_cache_blocks is not None and self.kv_cache_blocks > INT32_MAX:
            raise ConfigError(
                f"kv_cache_blocks={self.kv_cache_blocks} is more than {INT32_MAX} blocks (block "
                "ids travel between ranks as int32); lower --kv-cache-blocks"
            )
        check_device_name(self.device)
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 2
        ):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(
                f"engine seed (--engine-seed) must be in [0, 2**63), got {self.seed!r}"
            )
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)} (or unset "
                f"for the device's default), got {self.attention_backend!r}"
            )
        check_seconds("startup_timeout_s", "--startup-timeout", self.startup_timeout_s)
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.async_scheduling not in (None, True, False):
            raise ConfigError(
                f"async_scheduling must be True, False or None (the device's default), "
                f"got {self.async_scheduling!r}"
            )
        if self.async_scheduling and self.parallel.pp_size > 1:
            raise ConfigError(
                f"async scheduling (--async-scheduling) needs pp_size 1, got pp_size="
                f"{self.parallel.pp_size}: with several stages the pipeline already overlaps "
                "microbatches; drop --async-scheduling or run one stage"
            )
        if self.async_scheduling and self.parallel.deterministic:
            raise ConfigError(
                "async scheduling (--async-scheduling) is not available in deterministic "
                "mode (--deterministic / PPRUNTIME_DETERMINISTIC=1): drop one of them"
            )
        if self.activation_channel not in ACTIVATION_CHANNELS:
            raise ConfigError(
                f"activation_channel (--activation-channel / PPRUNTIME_ACTIVATION_CHANNEL) must "
                f"be one of {', '.join(ACTIVATION_CHANNELS)}, got {self.activation_channel!r}"
            )
