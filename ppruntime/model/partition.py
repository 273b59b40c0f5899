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


# ----------------------------------------------------------------------------------------
# `--layer-partition auto`: balance measured per-rank costs
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankCosts:
    """What one rank measured, in seconds per (weighted) microbatch, and what it can hold.

    A stage on this rank costs `fixed_s + layers * layer_s`, plus `embed_s` when it is
    the first stage and `head_s` (final norm, LM head, sampling) when it is the last.
    `memory_bytes` is what this rank may fill with weights (None = no limit).
    """

    layer_s: float
    embed_s: float = 0.0
    head_s: float = 0.0
    fixed_s: float = 0.0
    memory_bytes: int | None = None

    def stage_time(self, num_layers: int, is_first: bool, is_last: bool) -> float:
        time = self.fixed_s + num_layers * self.layer_s
        if is_first:
            time += self.embed_s
        if is_last:
            time += self.head_s
        return time

    def to_dict(self) -> dict:
        return {
            "layer_s": self.layer_s,
            "embed_s": self.embed_s,
            "head_s": self.head_s,
            "fixed_s": self.fixed_s,
            "memory_bytes": self.memory_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RankCosts:
        try:
            costs = cls(
                layer_s=float(data["layer_s"]),
                embed_s=float(data.get("embed_s", 0.0)),
                head_s=float(data.get("head_s", 0.0)),
                fixed_s=float(data.get("fixed_s", 0.0)),
                memory_bytes=None
                if data.get("memory_bytes") is None
                else int(data["memory_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PartitionError(f"partition costs entry {data!r} is malformed: {exc}") from None
        if min(costs.layer_s, costs.embed_s, costs.head_s, costs.fixed_s) < 0:
            raise PartitionError(f"partition costs entry {data!r} has a negative time")
        return costs


@dataclass(frozen=True)
class StageBytes:
    """Weight bytes of the pieces a stage may hold (the same on every rank)."""

    layer: int
    embed: int = 0
    head: int = 0

    def stage_bytes(self, num_layers: int, is_first: bool, is_last: bool) -> int:
        return (
            num_layers * self.layer
            + (self.embed if is_first else 0)
            + (self.head if is_last else 0)
        )


@dataclass(frozen=True)
class CostBalancedPartition:
    counts: tuple[int, ...]
    stage_times: tuple[float, ...]  # predicted seconds per microbatch, per stage

    @property
    def slowest_s(self) -> float:
        return max(self.stage_times)

    @property
    def imbalance(self) -> float:
        """Slowest over fastest predicted stage time (1.0 = perfectly balanced)."""
        fastest = min(self.stage_times)
        return self.slowest_s / fastest if fastest > 0 else float("inf")


def balance_by_cost(
    num_layers: int, costs: Sequence[RankCosts], sizes: StageBytes | None = None
) -> CostBalancedPartition:
    """The contiguous split that minimises the slowest stage, within each rank's memory.

    Stage r runs on rank r, so a slow rank gets fewer layers. Among the splits with the
    smallest slowest stage, the one with the smallest sum of squared stage times is
    taken (the other stages as even as they can be), ties going to the earlier stages
    holding more layers. Exact (dynamic programming), deterministic given the costs.
    """
    pp_size = len(costs)
    if pp_size < 1:
        raise PartitionError("auto partition needs the costs of at least one rank")
    if pp_size > num_layers:
        raise PartitionError(
            f"pp_size={pp_size} but the model has only {num_layers} layers: "
            f"use --pp-size {num_layers} or fewer"
        )

    def stage_cost(stage: int, layers: int) -> float | None:
        """Predicted time of `layers` layers on rank `stage`; None when they do not fit."""
        is_first, is_last = stage == 0, stage == pp_size - 1
        limit = costs[stage].memory_bytes
        if (
            limit is not None
            and sizes is not None
            and sizes.stage_bytes(layers, is_first, is_last) > limit
        ):
            return None
        return costs[stage].stage_time(layers, is_first, is_last)

    def solve(objective, bound: float | None):
        # best[s][n]: (value, counts) for stages 0..s-1 holding layers 0..n-1
        inf = float("inf")
        best: list[dict[int, tuple[float, tuple[int, ...]]]] = [{0: (0.0, ())}]
        for stage in range(pp_size):
            row: dict[int, tuple[float, tuple[int, ...]]] = {}
            stages_left = pp_size - stage - 1
            for done, (value, counts) in best[stage].items():
                for layers in range(num_layers - done - stages_left, 0, -1):
                    if stage == pp_size - 1 and done + layers != num_layers:
                        continue
                    cost = stage_cost(stage, layers)
                    if cost is None or (bound is not None and cost > bound):
                        continue
                    total = done + layers
                    candidate = (objective(value, cost), (*counts, layers))
                    if candidate[0] < row.get(total, (inf, ()))[0]:
                        row[total] = candidate
            best.append(row)
        return best[pp_size].get(num_layers)

    minimax = solve(max, None)
    if minimax is None:
        raise PartitionError(
            f"no split of {num_layers} layers over {pp_size} ranks fits every rank's memory "
            f"(per layer {sizes.layer if sizes else 0} bytes; limits "
            f"{[c.memory_bytes for c in costs]}): use more ranks or a smaller KV cache"
        )
    slowest = minimax[0]
    even = solve(lambda value, cost: value + cost * cost, slowest * (1 + 1e-9))
    counts = even[1] if even is not None else minimax[1]
    times = tuple(
        costs[stage].stage_time(count, stage == 0, stage == pp_size - 1)
        for stage, count in enumerate(counts)
    )
    return CostBalancedPartition(tuple(counts), times)
