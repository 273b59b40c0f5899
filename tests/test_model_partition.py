"""Layer partitioning: validation messages and the default balance (pure functions)."""

from __future__ import annotations

import pytest

from ppruntime.model import (
    PartitionError,
    StageSpec,
    parse_layer_partition,
    partition_layers,
    preset_config,
    stage_extra_costs,
)


def counts(stages: list[StageSpec]) -> list[int]:
    return [stage.num_layers for stage in stages]


def test_explicit_partition_is_used_and_contiguous():
    stages = partition_layers(16, 4, (3, 5, 5, 3))
    assert counts(stages) == [3, 5, 5, 3]
    assert [(s.layer_start, s.layer_end) for s in stages] == [(0, 3), (3, 8), (8, 13), (13, 16)]
    assert stages[0].is_first_stage and not stages[0].is_last_stage
    assert stages[-1].is_last_stage and not stages[-1].is_first_stage
    assert all(s.num_stages == 4 for s in stages)


def test_single_stage_is_first_and_last():
    (stage,) = partition_layers(7, 1)
    assert stage.is_first_stage and stage.is_last_stage and stage.num_layers == 7


def test_default_without_extras_is_even():
    assert counts(partition_layers(8, 4)) == [2, 2, 2, 2]
    assert sorted(counts(partition_layers(7, 2))) == [3, 4]


def test_default_moves_layers_away_from_the_head_stage():
    stages = partition_layers(16, 4, last_stage_extra_cost=2.0)
    assert counts(stages) == [5, 5, 4, 2]  # stage costs 5, 5, 4, 4: the best max is 5
    assert counts(partition_layers(32, 4, last_stage_extra_cost=0.5)) == [8, 8, 8, 8]
    assert counts(partition_layers(32, 4, last_stage_extra_cost=1.5)) == [9, 8, 8, 7]
    stages = partition_layers(16, 4, first_stage_extra_cost=1.0, last_stage_extra_cost=1.0)
    assert counts(stages)[0] < 5 and counts(stages)[-1] < 5  # stage costs <= 5 (18 / 4 -> 5)
    assert max(counts(stages)) == 5
    # Huge extras never leave a stage without a layer.
    assert counts(partition_layers(4, 4, last_stage_extra_cost=100.0)) == [1, 1, 1, 1]


def test_stage_extra_costs_for_presets():
    first, last = stage_extra_costs(preset_config("bench-small"))
    assert first == 0.0
    assert 0.2 < last < 0.6  # LM head 1024x4096 vs ~11.8M MACs per layer


@pytest.mark.parametrize(
    "args, message",
    [
        (
            (7, 2, (2, 3)),
            "layer partition 2,3 sums to 5 but the model has 7 layers; "
            "give 2 numbers that sum to 7",
        ),
        ((7, 2, (7, 0)), "every stage needs >= 1"),
        ((7, 3, (3, 4)), "has 2 stages but pp_size=3"),
        ((4, 8, None), "pp_size=8 but the model has only 4 layers: use --pp-size 4 or fewer"),
        ((4, 0, None), "at least 1 stage"),
    ],
)
def test_partition_errors_say_what_to_change(args, message):
    with pytest.raises(PartitionError, match=message.replace("(", r"\(")):
        partition_layers(*args)


def test_parse_layer_partition():
    assert parse_layer_partition("3,5,5,3") == (3, 5, 5, 3)
    assert parse_layer_partition(" 2, 2 ") == (2, 2)
    with pytest.raises(PartitionError, match="'x' is not an integer"):
        parse_layer_partition("3,x")
    with pytest.raises(PartitionError, match="is not an integer"):
        parse_layer_partition("3,,2")
    with pytest.raises(PartitionError, match=">= 1"):
        parse_layer_partition("3,0")
    assert issubclass(PartitionError, ValueError)
