"""GPU checks of async scheduling (PP=1): step k+1 launched before step k's tokens land.

Skipped without a GPU (CI has none); run on a GPU machine with scripts/gpu_check.sh.
Every engine here captures and replays CUDA graphs (PPRUNTIME_FORCE_CUDA_GRAPHS=1, a
no-op with the default triton backend), and each async run asserts that sequences were
continued with their input token gathered on the device, so none can pass by running
the synchronous loop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_scenarios import abort_one_mid_decode, decode_batch
from model_fixtures import make_tiny_checkpoint

from ppruntime import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 5, 9, 13, 21, 34], [7, 3, 2], list(range(40, 80)), [11, 12], [100, 101, 102]]
BF16_CLEAR_GAP = 0.1  # nats between the top-2 log-probs: a tie-free step
FP32_CLEAR_GAP = 1e-3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, dtype): tiny float32, and a small bf16 one."""
    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")
    small = make_tiny_checkpoint(
        tmp_path_factory.mktemp("small"),
        "llama",
        dtype=torch.bfloat16,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return {"tiny-fp32": (str(tiny), "float32"), "small-bf16": (str(small), "bfloat16")}


def _generate(monkeypatch, model, dtype, async_scheduling: bool | None, params):
    monkeypatch.setenv("PPRUNTIME_FORCE_CUDA_GRAPHS", "1")
    with LLM(
        model,
        device="cuda",
        dtype=dtype,
        kv_cache_blocks=256,
        max_batch_size=16,
        async_scheduling=async_scheduling,
        exit_workers=False,
    ) as llm:
        outputs = llm.generate([np.asarray(p) for p in PROMPTS], params, use_tqdm=False)
        executor = llm._engine.executor
        assert executor.runner.num_replays > 0, "no decode step replayed a graph"
        assert executor.table.all_blocks_free()
        assert (executor.overlap is not None) == (async_scheduling is not False)
        return outputs, executor.stats.rows_continued


def assert_same_greedy_tokens(got, want, clear_gap: float) -> None:
    """Equal tokens up to the first step whose top-2 log-probs in `want` are closer
    than clear_gap (a finished request's discarded row may change the bucket, and with
    it the matmul shapes, one step earlier than without async scheduling)."""
    for index, (g, w) in enumerate(zip(got, want)):
        for step, (got_token, want_token) in enumerate(zip(g.token_ids, w.token_ids)):
            if got_token == want_token:
                continue
            top = sorted(w.logprobs[step].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else math.inf
            assert gap < clear_gap, (
                f"prompt {index} step {step}: {got_token} != {want_token} "
                f"with a top-2 gap of {gap:.4f}"
            )
            break
        assert len(g.token_ids) == len(w.token_ids)


@pytest.mark.parametrize("name", ["tiny-fp32", "small-bf16"])
def test_async_on_and_off_give_the_same_greedy_tokens_with_graphs(monkeypatch, checkpoints, name):
    model, dtype = checkpoints[name]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    sync, continued = _generate(monkeypatch, model, dtype, False, params)
    assert continued == 0
    overlapped, continued = _generate(monkeypatch, model, dtype, None, params)  # the default
    assert continued > 0
    clear_gap = FP32_CLEAR_GAP if dtype == "float32" else BF16_CLEAR_GAP
    assert_same_greedy_tokens(overlapped, sync, clear_gap)


def test_stops_and_seeds_mid_flight_match_the_synchronous_loop(monkeypatch, checkpoints):
    model, dtype = checkpoints["tiny-fp32"]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    baseline, _ = _generate(monkeypatch, model, dtype, False, greedy)
    params = [
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[baseline[0].token_ids[3]]),
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[baseline[3].token_ids[9]]),
        SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=3, ignore_eos=True),
    ]
    sync, _ = _generate(monkeypatch, model, dtype, False, params)
    overlapped, continued = _generate(monkeypatch, model, dtype, True, params)
    assert continued > 0
    for ours, reference in zip(overlapped, sync):
        assert ours.token_ids == reference.token_ids
        assert ours.finish_reason == reference.finish_reason
    assert sync[0].finish_reason == "stop" and sync[1].finish_reason == "length"


def test_abort_mid_decode_frees_every_block_with_async_scheduling(monkeypatch, checkpoints):
    model, _ = checkpoints["tiny-fp32"]
    monkeypatch.setenv("PPRUNTIME_FORCE_CUDA_GRAPHS", "1")
    with LLM(
        model,
        device="cuda",
        kv_cache_blocks=256,
        max_batch_size=16,
        async_scheduling=True,
        exit_workers=False,
    ) as llm:
        finished, victim, others = abort_one_mid_decode(llm, PROMPTS)
        assert finished[victim].finish_reason == "abort"
        assert 5 <= len(finished[victim].token_ids) < 200
        assert all(len(finished[r].token_ids) == 40 for r in others)
        executor = llm._engine.executor
        assert executor.runner.num_replays > 0 and executor.stats.rows_continued > 0
        assert executor.table.all_blocks_free() and not executor.table.num_in_flight_batches


# -- the step-input pool: pinned, double-buffered host staging ---------------------------
def test_step_inputs_written_while_the_gpu_is_busy_reach_it_intact():
    """Three steps prepared while the GPU is still busy (a long sleep kernel queued in
    front): each step's device buffers, snapshotted in stream order right after its
    copies, hold that step's inputs, not a later step's (the host never rewrites a
    pinned buffer whose copy has not run)."""
    from ppruntime.stage.step_inputs import CarriedTokens, StepInputPool

    device = torch.device("cuda")
    block_table = np.arange(8 * 4, dtype=np.int32).reshape(8, 4)
    token_table = np.arange(8 * 16, dtype=np.int32).reshape(8, 16)
    pool = StepInputPool(block_table, np.zeros(8, bool), 4, 32, 8, token_table, device)
    batches = [decode_batch([0, 1, 2], [3, 4, 5]), decode_batch([4, 5], [7, 8])]
    batches.append(decode_batch([6, 7, 3, 2], [1, 2, 9, 10]))
    sampled = torch.tensor([500, 501, 502], dtype=torch.int32, device=device)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time: every copy below waits behind it
    snapshots = []
    for index, batch in enumerate(batches):
        carried = None
        if index == 2:  # its first row's token is another step's sample, on the device
            carried = CarriedTokens(sampled, np.array([1]), np.array([0]))
        inputs = pool.prepare(batch, carried=carried)
        snapshots.append(
            (inputs.positions.clone(), inputs.token_ids.clone(), inputs.attn.seq_lens.clone())
        )
    torch.cuda.synchronize()
    for index, (batch, (positions, tokens, seq_lens)) in enumerate(zip(batches, snapshots)):
        assert positions.tolist() == batch.starts.tolist()
        assert seq_lens.tolist() == (batch.starts + 1).tolist()
        expected = token_table[batch.slots, batch.starts].tolist()
        if index == 2:
            expected[0] = 501
        assert tokens.tolist() == expected
