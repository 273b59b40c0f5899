"""Decode padding for CUDA graphs, checked on CPU ("eager padded": the same code path
without the capture): bucket choice, the padded step inputs, a padded forward that
leaves the real rows and the KV cache as an unpadded one does, and whole engines
(PP=1 in-process, PP=2 under mpirun) giving the same greedy tokens with padding forced.
The capture and replay themselves run in tests/test_gpu_graphs.py on a GPU.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from engine_scenarios import decode_batch
from launching import mpi_env, run_mpi, start_process, wait_all

from ppruntime import LLM, SamplingParams
from ppruntime.comm.waiting import WaitTracker, wait_until
from ppruntime.model import load_config, load_stage_model, partition_layers
from ppruntime.stage.graphs import (
    DecodeGraphs,
    DecodePlan,
    bucket_for,
    capture_sizes,
    plan_decode,
)
from ppruntime.stage.runner import StageRunner
from ppruntime.stage.step_inputs import StepInputPool

BLOCK_SIZE = 4
MAX_SLOTS = 12
MAX_BLOCKS = 6


def test_capture_sizes_follow_vllm_steps():
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(3) == (1, 2, 3)
    assert capture_sizes(1) == (1,)


def test_bucket_is_the_smallest_that_holds_the_batch():
    sizes = capture_sizes(20)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 20)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        16,
        20,
        20,
    ]
    with pytest.raises(ValueError, match="exceeds the largest bucket 20"):
        bucket_for(21, sizes)


class _Backend:
    def __init__(self, capturable: bool | None) -> None:
        self.name = "fake"
        if capturable is not None:
            self.supports_cuda_graphs = capturable


class _Model(torch.nn.Module):
    def __init__(self, backend) -> None:
        super().__init__()
        self.attention_backend = backend


def test_plan_turns_graphs_on_only_for_cuda_with_a_capturable_backend():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    capturable = _Model(_Backend(True))
    plan = plan_decode(cuda, capturable, 16, cuda_graphs=True)
    assert plan.use_graphs and plan.sizes == (1, 2, 4, 8, 16) and plan.reason == ""
    off = plan_decode(cuda, capturable, 16, cuda_graphs=False)
    assert not off.use_graphs and not off.pads and "enforce-eager" in off.reason
    for model in (_Model(_Backend(None)), _Model(_Backend(False)), torch.nn.Linear(2, 2)):
        plan = plan_decode(cuda, model, 16, cuda_graphs=True)
        assert not plan.use_graphs and "not capturable" in plan.reason
    assert not plan_decode(cpu, capturable, 16, cuda_graphs=True).use_graphs
    forced = plan_decode(cpu, capturable, 16, cuda_graphs=True, force_padding=True)
    assert forced.pads and not forced.use_graphs and forced.sizes == (1, 2, 4, 8, 16)
    uncapturable = _Model(_Backend(False))
    assert plan_decode(cuda, uncapturable, 16, cuda_graphs=True, force_graphs=True).use_graphs
    assert not plan_decode(cpu, uncapturable, 16, cuda_graphs=True, force_graphs=True).use_graphs


# -- step inputs and one stage's forward ------------------------------------------------
def _pool(token_table=None) -> StepInputPool:
    # every slot owns its own blocks: slot s, block j -> block s * MAX_BLOCKS + j
    block_table = np.arange(MAX_SLOTS * MAX_BLOCKS, dtype=np.int32).reshape(MAX_SLOTS, -1)
    return StepInputPool(
        block_table,
        np.zeros(MAX_SLOTS, bool),
        BLOCK_SIZE,
        64,
        MAX_SLOTS,
        token_table,
        torch.device("cpu"),
    )


def test_padded_step_inputs_write_harmless_rows():
    tokens = np.random.default_rng(0).integers(3, 250, (MAX_SLOTS, MAX_BLOCKS * BLOCK_SIZE))
    pool = _pool(tokens.astype(np.int32))
    batch = decode_batch([5, 2, 9], [7, 12, 3])
    plain = pool.prepare(batch)
    plain_values = {
        "positions": plain.positions.tolist(),
        "slot_mapping": plain.attn.slot_mapping.tolist(),
        "token_ids": plain.token_ids.tolist(),
        "seq_lens": plain.attn.seq_lens.tolist(),
    }
    padded = pool.prepare(batch, pad_to=8)
    assert padded.num_tokens == 3 and padded.num_rows == 8
    assert padded.sample_token_index.tolist() == [0, 1, 2]  # padded rows sample nothing
    assert padded.attn.num_padded_tokens == 5
    assert padded.attn.query_start_loc.tolist() == list(range(9))
    got = {
        "positions": padded.positions.tolist(),
        "slot_mapping": padded.attn.slot_mapping.tolist(),
        "token_ids": padded.token_ids.tolist(),
        "seq_lens": padded.attn.seq_lens.tolist(),
    }
    for name, pad_value in (("positions", 0), ("slot_mapping", -1), ("token_ids", 0)):
        assert got[name] == plain_values[name] + [pad_value] * 5, name
    assert got["seq_lens"] == plain_values["seq_lens"] + [0] * 5
    assert padded.attn.block_table_rows.tolist() == [5, 2, 9] + [5] * 5
    # the next unpadded step is not confused by the padding left in the buffers
    again = pool.prepare(batch)
    assert again.attn.slot_mapping.tolist() == plain_values["slot_mapping"]
    assert again.attn.num_padded_tokens == 0 and again.num_rows == 3
    with pytest.raises(ValueError, match="pad_to=2"):
        pool.prepare(batch, pad_to=2)


@pytest.fixture(scope="module")
def tiny_stages():
    config = load_config("tiny")
    specs = partition_layers(config.num_hidden_layers, 2)
    return config, [load_stage_model("tiny", spec) for spec in specs], specs


def _run_stages(tiny_stages, plan: DecodePlan, batch, token_table, caches):
    """Both stages of the tiny model on one decode batch -> (last hidden, runners)."""
    config, models, specs = tiny_stages
    hidden = None
    runners = []
    for model, spec, cache in zip(models, specs, caches):
        runner = StageRunner(model, spec, cache, _pool(token_table), 0, decode_plan=plan)
        runner.reserve_device_input(64 * config.hidden_size)
        hidden, inputs = runner.forward(batch, hidden)
        assert inputs.num_tokens == batch.num_seqs
        runners.append(runner)
    return hidden, runners


def test_padded_forward_matches_unpadded_and_writes_no_kv_for_padded_rows(tiny_stages):
    config, models, specs = tiny_stages
    rng = torch.Generator().manual_seed(3)
    tokens = np.random.default_rng(1).integers(3, 250, (MAX_SLOTS, MAX_BLOCKS * BLOCK_SIZE))
    token_table = tokens.astype(np.int32)
    head_dim = config.hidden_size // config.num_attention_heads
    caches = [  # random contents: a stray write anywhere would show
        torch.randn(
            (
                len(m.layers),
                2,
                MAX_SLOTS * MAX_BLOCKS,
                BLOCK_SIZE,
                config.num_key_value_heads,
                head_dim,
            ),
            generator=rng,
        )
        for m in models
    ]
    batch = decode_batch([5, 2, 9, 0, 11], [7, 12, 3, 20, 1])  # 5 rows -> bucket 8
    plain_caches = [c.clone() for c in caches]
    padded_caches = [c.clone() for c in caches]
    plain, _ = _run_stages(tiny_stages, DecodePlan(), batch, token_table, plain_caches)
    plan = DecodePlan(sizes=capture_sizes(8))
    padded, runners = _run_stages(tiny_stages, plan, batch, token_table, padded_caches)
    assert all(r.num_padded_forwards == 1 for r in runners)
    assert padded.shape == plain.shape == (5, config.hidden_size)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    written = {int(s) * MAX_BLOCKS * BLOCK_SIZE + int(p) for s, p in zip(batch.slots, batch.starts)}
    for before, after_plain, after_padded in zip(caches, plain_caches, padded_caches):
        flat = lambda c: c.reshape(c.shape[0], 2, -1, *c.shape[-2:])
        untouched = [i for i in range(MAX_SLOTS * MAX_BLOCKS * BLOCK_SIZE) if i not in written]
        assert torch.equal(flat(after_padded)[:, :, untouched], flat(before)[:, :, untouched])
        torch.testing.assert_close(after_padded, after_plain, atol=1e-5, rtol=1e-5)


class EagerReplayGraphs(DecodeGraphs):
    """CUDA-graph semantics on CPU: a replay re-runs what was captured on the very tensors
    it was captured with (fixed addresses) and rewrites one output buffer per size."""

    def capture(self, sizes, prepare, run) -> None:
        for size in sizes:
            inputs = prepare(size)
            output = run(inputs, size)
            self.graphs[size] = lambda i=inputs, n=size, out=output: out.copy_(run(i, n))

    def replay(self, size: int) -> torch.Tensor:
        return self.graphs[size]()


def test_replays_read_the_persistent_buffers_and_outputs_survive_the_next_replay(tiny_stages):
    config, models, specs = tiny_stages
    tokens = np.random.default_rng(2).integers(3, 250, (MAX_SLOTS, MAX_BLOCKS * BLOCK_SIZE))
    token_table = tokens.astype(np.int32)

    def runners(plan):
        made = []
        for model, spec in zip(models, specs):
            cache = torch.zeros(
                (
                    len(model.layers),
                    2,
                    MAX_SLOTS * MAX_BLOCKS,
                    BLOCK_SIZE,
                    config.num_key_value_heads,
                    config.hidden_size // config.num_attention_heads,
                )
            )
            runner = StageRunner(model, spec, cache, _pool(token_table), 0, decode_plan=plan)
            runner.reserve_device_input(64 * config.hidden_size)
            made.append(runner)
        return made

    eager = runners(DecodePlan())
    graphed = runners(DecodePlan(sizes=capture_sizes(8), use_graphs=True))
    for runner, twin in zip(graphed, eager):
        runner.graphs = EagerReplayGraphs()
        runner.capture_decode_graphs(max_seq_len=MAX_BLOCKS * BLOCK_SIZE)
        # the capture may write slot 0 (no sequence owns it yet); these batches read
        # positions they never wrote, so start both from the same cache
        twin.kv_cache.copy_(runner.kv_cache)
    batches = [
        decode_batch([5, 2, 9], [7, 12, 3]),
        decode_batch([1, 4, 6], [2, 9, 11]),  # same bucket: replays the same "graph"
        decode_batch([0, 1, 2, 3, 4, 6], [20, 1, 22, 9, 14, 2]),
        decode_batch([7], [4]),
    ]
    kept = []
    for batch in batches:
        pair = []
        for stage_runners in (eager, graphed):
            outputs = []
            for runner in stage_runners:
                hidden = None if not outputs else outputs[-1].clone()
                outputs.append(runner.forward(batch, hidden)[0])
            pair.append(outputs)
        for eager_hidden, graphed_hidden in zip(*pair):
            torch.testing.assert_close(graphed_hidden, eager_hidden, atol=1e-5, rtol=1e-5)
        kept.append(pair)
    for eager_outputs, graphed_outputs in kept:
        # a stage that sends its output keeps it past later replays (it may still be on
        # its way); the last stage samples from the replay's own output before the next
        # one (no copy), so only the first stage's outputs are checked here
        torch.testing.assert_close(graphed_outputs[0], eager_outputs[0], atol=1e-5, rtol=1e-5)
    assert [r.num_replays for r in graphed] == [len(batches)] * 2
    for runner, twin in zip(graphed, eager):
        torch.testing.assert_close(runner.kv_cache, twin.kv_cache, atol=1e-5, rtol=1e-5)


def test_waits_run_the_poll_hook():
    tracker = WaitTracker()
    calls = []
    tracker.on_poll = lambda: calls.append(1)
    polls = iter(range(4))
    wait_until(lambda: next(polls) == 3, "three polls", tracker)
    assert len(calls) == 2  # between the misses of polls 1 and 2 (poll 0 is before the wait)


# -- whole engines ----------------------------------------------------------------------
PROMPTS = [[1, 5, 9, 13, 21, 34], [7, 3, 2], list(range(40, 60)), [11, 12], [100, 101, 102]]


def _generate_in_process(monkeypatch, pad: bool):
    if pad:
        monkeypatch.setenv("PPRUNTIME_PAD_DECODE", "1")
    else:
        monkeypatch.delenv("PPRUNTIME_PAD_DECODE", raising=False)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
    with LLM(preset="tiny", device="cpu", max_batch_size=16, exit_workers=False) as llm:
        outputs = llm.generate([np.asarray(p) for p in PROMPTS], params, use_tqdm=False)
        runner = llm._engine.executor.runner
        free = llm._engine.executor.table.blocks.num_free_blocks
        total = llm._engine.executor.table.blocks.num_blocks
    return outputs, runner.num_padded_forwards, free == total


@pytest.fixture(scope="module")
def unpadded_tokens():
    with pytest.MonkeyPatch.context() as monkeypatch:
        outputs, padded_forwards, _ = _generate_in_process(monkeypatch, pad=False)
    assert padded_forwards == 0
    return outputs


def test_engine_with_padding_forced_gives_the_same_greedy_tokens(monkeypatch, unpadded_tokens):
    outputs, padded_forwards, all_free = _generate_in_process(monkeypatch, pad=True)
    assert padded_forwards > 0  # 5 sequences decode in a bucket of 8
    assert all_free
    for got, want in zip(outputs, unpadded_tokens):
        assert got.token_ids == want.token_ids
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            assert got_step.keys() == want_step.keys()
            np.testing.assert_allclose(
                [got_step[t] for t in want_step], list(want_step.values()), atol=1e-4
            )


def test_pp2_with_padding_forced_gives_the_same_greedy_tokens(tmp_path, unpadded_tokens):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    command = [
        sys.executable,
        "-m",
        "ppruntime",
        "generate",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--prompts-file",
        str(prompts),
        "--max-tokens",
        "10",
        "--ignore-eos",
        "--json",
        "--max-batch-size",
        "16",
        "--quiet",
    ]
    env = {"PPRUNTIME_PAD_DECODE": "1", "PPRUNTIME_DEVICE": "cpu"}
    result = run_mpi(2, command, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = [json.loads(line)["token_ids"] for line in result.stdout.splitlines()]
    assert tokens == [output.token_ids for output in unpadded_tokens]


def test_enforce_eager_flag_and_config_field():
    from ppruntime.cli import build_parser
    from ppruntime.config import ConfigError, EngineConfig

    parser = build_parser()
    assert parser.parse_args(["generate", "--enforce-eager"]).enforce_eager is True
    assert parser.parse_args(["generate"]).enforce_eager is False
    assert EngineConfig().cuda_graphs is True
    with pytest.raises(ConfigError, match="cuda_graphs must be True or False, got 'no'"):
        EngineConfig(cuda_graphs="no")


def test_triton_backend_with_padding_forced_gives_the_same_greedy_tokens(tmp_path):
    """The capturable backend's own padded-row handling (slot -1 writes nothing, seq_len 0
    gives zeros), interpreted on CPU: padded and unpadded runs agree."""
    pytest.importorskip("triton", reason="the triton backend needs the triton package")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    command = [
        *(sys.executable, "-m", "ppruntime", "generate", "--preset", "tiny", "--device", "cpu"),
        *("--prompts-file", str(prompts), "--max-tokens", "5", "--ignore-eos", "--json"),
        *("--max-batch-size", "16", "--quiet", "--attention-backend", "triton"),
    ]
    # both runs at once: each is one interpreted process on one core
    procs = [
        start_process(command, mpi_env({"TRITON_INTERPRET": "1", "PPRUNTIME_PAD_DECODE": pad}))
        for pad in ("1", "0")
    ]
    results = wait_all(procs, 240)
    runs = []
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "attention backend: triton" in result.stderr, result.stderr[-3000:]
        runs.append([json.loads(line)["token_ids"] for line in result.stdout.splitlines()])
    assert len(runs[0]) == len(PROMPTS)
    assert runs[0] == runs[1]
