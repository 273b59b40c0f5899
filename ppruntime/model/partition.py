"""Split a model's decoder layers into pipeline stages (pure: no torch, no MPI).

Cost model for the default split: every decoder layer costs 1. The first and the
last stage may carry extra work expressed in the same unit ("decoder layers"):
see `stage_extra_costs`. The default split minimises the most expensive stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppruntime.model.config import ModelConfig


class PartitionError(ValueError):
    """A layer partition or pipeline size that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class StageSpec:
    """Which decoder layers one pipeline stage owns: global layers [layer_start, layer_end)."""

    stage_index: int
    num_stages: int
    layer_start: int
    layer_end: int

    def __post_init__(self) -> None:
        if not 0 <= self.stage_index < self.num_stages:
            raise PartitionError(
                f"stage_index={self.stage_index} is outside 0..{self.num_stages - 1}"
            )
        if not 0 <= self.layer_start < self.layer_end:
            raise PartitionError(
                f"stage {self.stage_index} has layers [{self.layer_start}, {self.layer_end}): "
                "every stage needs at least one layer"
            )

    @property
    def is_first_stage(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def full_model_stage(num_layers: int) -> StageSpec:
    """The single stage of a PP=1 run."""
    return StageSpec(stage_index=0, num_stages=1, layer_start=0, layer_end=num_layers)


def parse_layer_partition(text: str) -> tuple[int, ...]:
    """Parse "3,5,5,3" into (3, 5, 5, 3). Only checks the syntax (integers >= 1)."""
    parts = [part.strip() for part in text.split(",")]
    counts = []
    for part in parts:
        try:
            counts.append(int(part))
        except ValueError:
            raise PartitionError(
                f"layer partition {text!r} is not a comma-separated list of integers "
                f"({part!r} is not an integer); write it like 3,5,5,3"
            ) from None
    for count in counts:
        if count < 1:
            raise PartitionError(
                f"layer partition {text!r} gives a stage {count} layers; every stage needs >= 1"
            )
    return tuple(counts)


def partition_layers(
    num_layers: int,
    pp_size: int,
    layer_partition: Sequence[int] | None = None,
    *,
    first_stage_extra_cost: float = 0.0,
    last_stage_extra_cost: float = 0.0,
) -> list[StageSpec]:
    """Split `num_layers` decoder layers into `pp_size` contiguous stages.

    With `layer_partition` (layers per stage) the split is validated and used as given.
    Otherwise the split minimises the largest stage cost, where a stage costs its number
    of layers plus `first_stage_extra_cost` (stage 0) / `last_stage_extra_cost` (last
    stage); with PP=1 both extras land on the one stage.
    """
    if pp_size < 1:
        raise PartitionError(f"pp_size={pp_size}: the pipeline needs at least 1 stage")
    if num_layers < 1:
        raise PartitionError(f"the model has {num_layers} layers; it needs at least 1")
    if pp_size > num_layers:
        raise PartitionError(
            f"pp_size={pp_size} but the model has only {num_layers} layers: "
            f"use --pp-size {num_layers} or fewer"
        )
    if layer_partition is None:
        counts = _balanced_counts(
            num_layers, pp_size, first_stage_extra_cost, last_stage_extra_cost
        )
    else:
        counts = _validated_counts(num_layers, pp_size, layer_partition)
    stages = []
    start = 0
    for index, count in enumerate(counts):
        stages.append(StageSpec(index, pp_size, start, start + count))
        start += count
    return stages


def _validated_counts(num_layers: int, pp_size: int, layer_partition: Sequence[int]) -> list[int]:
    counts = list(layer_partition)
    shown = ",".join(str(c) for c in counts)
    if len(counts) != pp_size:
        raise PartitionError(
            f"layer partition {shown} has {len(counts)} stages but pp_size={pp_size}; "
            f"give {pp_size} numbers that sum to {num_layers}, or set --pp-size {len(counts)}"
        )
    for count in counts:
        if isinstance(count, bool) or not isinstance(count, int):
            raise PartitionError(f"layer partition {shown}: {count!r} is not an integer")
        if count < 1:
            raise PartitionError(
                f"layer partition {shown} gives a stage {count} layers; every stage needs >= 1"
            )
    if sum(counts) != num_layers:
        raise PartitionError(
            f"layer partition {shown} sums to {sum(counts)} but the model has {num_layers} "
            f"layers; give {pp_size} numbers that sum to {num_layers}"
        )
    return counts


def _balanced_counts(
    num_layers: int, pp_size: int, first_extra: float, last_extra: float
) -> list[int]:
    extras = [0.0] * pp_size
    extras[0] += first_extra
    extras[-1] += last_extra
    counts = [1] * pp_size
    # Give each remaining layer to the stage whose cost after taking it is smallest.
    # With unit-cost layers this greedy fill minimises the maximum stage cost.
    for _ in range(num_layers - pp_size):
        best = min(range(pp_size), key=lambda s: (counts[s] + 1 + extras[s], s))
        counts[best] += 1
    return counts


def stage_extra_costs(config: ModelConfig) -> tuple[float, float]:
    """(first_stage_extra, last_stage_extra) in units of "one decoder layer", by compute.

    Choice: balance per-token compute, which sets pipeline throughput.
    - Last stage: final norm (negligible) + LM head matmul, H*V multiply-adds per sampled
      token. In decode every token is sampled, so this is compared with one layer's
      per-token matmuls (attention projections + gated MLP).
    - First stage: the embedding is a row gather, ~0 compute, so 0. It does hold V*H
      parameters of memory; that is not balanced here (the KV-cache capacity, agreed as
      the minimum over ranks, absorbs it). Use an explicit --layer-partition to shift it.
    """
    hidden = config.hidden_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    attention_macs = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    mlp_macs = 3 * hidden * config.intermediate_size
    layer_macs = attention_macs + mlp_macs
    lm_head_macs = hidden * config.vocab_size
    return 0.0, lm_head_macs / layer_macs
