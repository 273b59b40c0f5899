"""The cost probe of `--layer-partition auto` (ppruntime/stage/cost_probe.py): what it
times and how, on the tiny preset (no timing thresholds: the machine is shared)."""

from __future__ import annotations

import torch

from ppruntime.engine.partition_costs import probe_key, probe_turns
from ppruntime.model import allocate_kv_cache, preset_config
from ppruntime.model.partition import StageSpec
from ppruntime.model.stage_model import StageModel
from ppruntime.stage import cost_probe
from ppruntime.stage.cost_probe import ProbeWorkload, measure_rank_costs
from ppruntime.stage.debug_knobs import StageKnobs

CPU = torch.device("cpu")


def _stage(layers: int) -> StageModel:
    config = preset_config("tiny")
    model = StageModel(config, StageSpec(1, 3, 0, layers), dtype=torch.float32, device=CPU)
    return cost_probe._fill_random(model)


def test_prefill_chunk_is_split_into_prompts_of_their_own_blocks():
    metadata, positions = cost_probe._prefill_batch(50, 4, block_size=8, device=CPU)
    lengths = metadata.seq_lens.tolist()
    assert lengths == [13, 13, 12, 12]
    assert metadata.query_start_loc.tolist() == [0, 13, 26, 38, 50]
    assert metadata.max_query_len == metadata.max_seq_len == 13
    # every prompt starts at position 0 and owns its own blocks: no slot written twice
    starts = metadata.query_start_loc.tolist()
    assert all(positions[start].item() == 0 for start in starts[:-1])
    assert len(set(metadata.slot_mapping.tolist())) == 50
    table = metadata.block_table
    for row, length in enumerate(lengths):
        blocks = -(-length // 8)
        slots = metadata.slot_mapping[starts[row] : starts[row + 1]]
        assert set((slots // 8).tolist()) == set(table[row, :blocks].tolist())


def test_prefill_chunk_never_has_more_prompts_than_tokens():
    metadata, _ = cost_probe._prefill_batch(3, 16, block_size=8, device=CPU)
    assert metadata.seq_lens.tolist() == [1, 1, 1]


def test_layer_times_are_taken_inside_the_whole_forward():
    model = _stage(3)
    clock = cost_probe.HostClock()
    layer_times = cost_probe._LayerTimes(model, clock)
    metadata, positions = cost_probe._decode_batch(4, 20, block_size=8, device=CPU)
    cache = allocate_kv_cache(model.config, model.stage, 16, 8)
    states = torch.randn(4, model.config.hidden_size)
    with torch.inference_mode():
        model(states, positions, metadata, cache)
        assert layer_times.marks == []  # not recording: an untimed (or captured) forward
        layer_times.recording = True
        start = clock.mark()
        model(states, positions, metadata, cache)
        whole = clock.seconds(start, clock.mark())
    assert len(layer_times.marks) == 3  # one interval per decoder layer
    layers = layer_times.take_seconds()
    assert 0 < layers <= whole  # the layers' intervals lie inside the forward's
    assert layer_times.marks == [] and layer_times.take_seconds() == 0


def test_eager_timer_times_a_forward_and_its_layers_on_the_host_clock():
    model = _stage(2)
    metadata, positions = cost_probe._decode_batch(4, 20, block_size=8, device=CPU)
    cache = allocate_kv_cache(model.config, model.stage, 16, 8)
    states = torch.randn(4, model.config.hidden_size)
    timer = cost_probe.EagerTimer(cost_probe.HostClock())
    timed = timer.forward(model, lambda: model(states, positions, metadata, cache))
    with torch.inference_mode():
        first, second = timed(), timed()
    for whole, layers in (first, second):
        assert 0 < layers <= whole  # each call takes only its own forward's layers
    assert timer.forward(model, lambda: None) is not None
    assert len(timer._layer_times) == 1  # one set of hooks per model, however often prepared


def test_the_cpu_times_eagerly_on_its_thread_clock_and_ranks_need_no_turns():
    timers = cost_probe.probe_timers(CPU, decode_graphs=False)
    assert isinstance(timers.decode, cost_probe.EagerTimer)
    assert timers.decode is timers.prefill  # one clock for both phases
    assert isinstance(timers.decode.clock, cost_probe.HostClock)
    assert not timers.take_turns  # a rank's CPU time is its own: ranks probe at once


def test_pieces_are_timed_in_interleaved_rounds():
    calls: list[str] = []

    def piece(name: str, values: list[float]):
        def run() -> dict[str, float]:
            calls.append(name)
            return {name: values[len([c for c in calls if c == name]) - 1]}

        return run

    medians = cost_probe._interleaved_medians(
        {"a": piece("a", [9.0, 1.0, 2.0, 3.0]), "b": piece("b", [9.0, 5.0, 7.0, 6.0])}, rounds=3
    )
    assert calls == ["a", "b"] * 4  # a warm-up round, then the rounds, one piece after the other
    assert medians == {"a": 2.0, "b": 6.0}  # the warm-up is not counted


def test_measured_costs_add_the_stage_delay_to_the_fixed_cost():
    config = preset_config("tiny")
    workload = ProbeWorkload(max_batch_size=4, max_num_tokens=32, block_size=8, repeats=2)
    knobs = StageKnobs(delay_s=0.25)
    costs, sizes = measure_rank_costs(config, workload, torch.float32, CPU, knobs=knobs)
    assert costs.layer_s > 0 and costs.head_s > 0 and costs.embed_s > 0
    assert costs.fixed_s >= 0.25  # the delay, plus what a forward costs beyond its layers
    one_layer = _stage(1)
    assert sizes.layer == cost_probe.weight_bytes(one_layer)
    element = 4
    assert sizes.embed == config.vocab_size * config.hidden_size * element
    assert sizes.head == sizes.embed + config.hidden_size * element


def test_ranks_sharing_a_device_probe_one_after_the_other():
    keys = ["h/cuda:0", "h/cuda:0", None, "h/cuda:1", "h/cuda:0"]
    assert probe_turns(keys) == [0, 1, 0, 0, 2]
    assert probe_turns([None, None]) == [0, 0]
    assert probe_key(CPU, "h") is None  # CPU ranks probe at once (their own CPU time)
