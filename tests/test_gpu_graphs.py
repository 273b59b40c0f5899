"""GPU checks of the decode step loop: CUDA graphs, pinned activation staging, determinism.

Skipped without a GPU (CI has none); run on a GPU machine with scripts/gpu_check.sh.
The engine runs use the default attention backend (`triton` on CUDA, capturable); they
also set PPRUNTIME_FORCE_CUDA_GRAPHS=1, which changes nothing with it and makes a run with
`PPRUNTIME_ATTENTION_BACKEND=torch` capture too (correct, only slow). The stage test runs
both backends. Every graph test asserts that graphs were captured and replayed, so none
can pass by running eagerly.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from engine_scenarios import abort_one_mid_decode, decode_batch
from launching import run_mpi
from model_fixtures import make_tiny_checkpoint

from ppruntime import LLM, SamplingParams
from ppruntime.config import DEPENDENT_LAUNCH_ENV
from ppruntime.kernels.dependent_launch import pdl_enabled
from ppruntime.model import load_config, load_stage_model, partition_layers
from ppruntime.model.backends import select_attention_backend
from ppruntime.model.layer_ops import select_layer_ops
from ppruntime.stage.graphs import DecodePlan, capture_sizes
from ppruntime.stage.runner import StageRunner
from ppruntime.stage.step_inputs import StepInputPool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 5, 9, 13, 21, 34], [7, 3, 2], list(range(40, 80)), [11, 12], [100, 101, 102]]
FORCE_GRAPHS = {"PPRUNTIME_FORCE_CUDA_GRAPHS": "1"}
BF16_CLEAR_GAP = 0.1  # nats between the reference's top-2 log-probs: a tie-free step
FP32_CLEAR_GAP = 1e-3
JOB_TIMEOUT_S = 300


# -- one stage: replay against the eager forward -----------------------------------------
BLOCK_SIZE = 4
MAX_SLOTS = 12
MAX_BLOCKS = 8


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stage_replays_match_the_eager_forward(backend):
    device = torch.device("cuda")
    config = load_config("tiny")
    specs = partition_layers(config.num_hidden_layers, 2)
    attention, ops = select_attention_backend(backend, device), select_layer_ops(backend, device)
    models = [load_stage_model("tiny", spec, "float32", device, attention, ops) for spec in specs]
    head_dim = config.hidden_size // config.num_attention_heads
    block_table = np.arange(MAX_SLOTS * MAX_BLOCKS, dtype=np.int32).reshape(MAX_SLOTS, -1)
    rng = np.random.default_rng(0)
    token_table = rng.integers(3, 250, (MAX_SLOTS, MAX_BLOCKS * BLOCK_SIZE)).astype(np.int32)
    generator = torch.Generator(device=device).manual_seed(0)

    def runner(model, spec, plan):
        shape = (len(model.layers), 2, MAX_SLOTS * MAX_BLOCKS, BLOCK_SIZE)
        shape += (config.num_key_value_heads, head_dim)
        cache = torch.randn(shape, generator=generator, device=device)
        pool = StepInputPool(
            block_table.copy(),
            np.zeros(MAX_SLOTS, bool),
            BLOCK_SIZE,
            64,
            MAX_SLOTS,
            token_table if spec.is_first_stage else None,
            device,
        )
        stage_runner = StageRunner(model, spec, cache, pool, 0, decode_plan=plan)
        stage_runner.reserve_device_input(64 * config.hidden_size)
        return stage_runner

    plan = DecodePlan(sizes=capture_sizes(8), use_graphs=True)
    eager = [runner(m, s, DecodePlan()) for m, s in zip(models, specs)]
    graphed = [runner(m, s, plan) for m, s in zip(models, specs)]
    for stage_runner, twin in zip(graphed, eager):
        stage_runner.capture_decode_graphs(max_seq_len=MAX_BLOCKS * BLOCK_SIZE)
        # the capture may write slot 0 (no sequence owns it yet); these batches read
        # positions they never wrote, so start both from the same cache
        twin.kv_cache.copy_(stage_runner.kv_cache)
        assert sorted(stage_runner.graphs.graphs) == [1, 2, 4, 8]
    batches = [
        decode_batch([3], [5]),
        decode_batch([5, 2, 9], [7, 12, 3]),
        decode_batch([0, 1, 2, 3, 4], [20, 1, 30, 9, 14]),
        decode_batch(list(range(8)), list(range(2, 26, 3))),
        decode_batch([5, 2, 9], [8, 13, 4]),  # the same slots one token later
    ]
    for batch in batches:
        outputs = []
        for runners in (eager, graphed):
            hidden = None
            for stage_runner in runners:
                if hidden is not None:
                    # as the host channel delivers them: through host memory into the
                    # stage's persistent input buffer on its device
                    count = hidden.numel()
                    received = stage_runner.input_buffer(count)[:count].view(hidden.shape)
                    received.copy_(hidden.cpu())
                    hidden = received
                hidden, _ = stage_runner.forward(batch, hidden)
            outputs.append(hidden)
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)
    for stage_runner, twin in zip(graphed, eager):
        assert stage_runner.num_replays == len(batches)
        torch.testing.assert_close(stage_runner.kv_cache, twin.kv_cache, atol=1e-4, rtol=1e-4)


# -- whole engines, in-process (PP=1) ---------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, dtype): tiny float32, and a small bf16 one."""
    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "llama")
    small = make_tiny_checkpoint(
        tmp_path_factory.mktemp("small"),
        "llama",
        dtype=torch.bfloat16,
        hidden_size=512,  # head_dim 64, a size every attention backend supports
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return {"tiny-fp32": (str(tiny), "float32"), "small-bf16": (str(small), "bfloat16")}


def _generate(monkeypatch, model, dtype, graphs: bool, params, **engine):
    if graphs:
        monkeypatch.setenv("PPRUNTIME_FORCE_CUDA_GRAPHS", "1")
    else:
        monkeypatch.delenv("PPRUNTIME_FORCE_CUDA_GRAPHS", raising=False)
    with LLM(
        model,
        device="cuda",
        dtype=dtype,
        kv_cache_blocks=256,
        max_batch_size=16,
        cuda_graphs=graphs,
        exit_workers=False,
        **engine,
    ) as llm:
        outputs = llm.generate([np.asarray(p) for p in PROMPTS], params, use_tqdm=False)
        runner = llm._engine.executor.runner
        blocks = llm._engine.executor.table.blocks
        assert blocks.num_free_blocks == blocks.num_blocks
        return outputs, len(runner.graphs.graphs), runner.num_replays


def assert_same_greedy_tokens(got, want, clear_gap: float | None) -> None:
    """Equal tokens; with clear_gap, equal up to the first step whose top-2 log-probs
    in `want` are closer than clear_gap (bf16 rounding may pick either there)."""
    for index, (g, w) in enumerate(zip(got, want)):
        for step, (got_token, want_token) in enumerate(zip(g.token_ids, w.token_ids)):
            if got_token == want_token:
                continue
            top = sorted(w.logprobs[step].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else math.inf
            assert clear_gap is not None and gap < clear_gap, (
                f"prompt {index} step {step}: {got_token} != {want_token} "
                f"with a top-2 gap of {gap:.4f}"
            )
            break
        assert len(g.token_ids) == len(w.token_ids)


@pytest.mark.parametrize("name", ["tiny-fp32", "small-bf16"])
def test_graphs_on_and_off_give_the_same_greedy_tokens(monkeypatch, capfd, checkpoints, name):
    model, dtype = checkpoints[name]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    eager, captured, replays = _generate(monkeypatch, model, dtype, False, params)
    assert captured == 0 and replays == 0
    graphed, captured, replays = _generate(monkeypatch, model, dtype, True, params)
    assert captured == len(capture_sizes(16)) and replays > 0
    assert "captured 5 decode CUDA graphs" in capfd.readouterr().err  # the log says so
    # padding changes the matmul shapes: only a near-tie may flip (fp32: ~1e-6 apart)
    assert_same_greedy_tokens(
        graphed, eager, FP32_CLEAR_GAP if dtype == "float32" else BF16_CLEAR_GAP
    )


def test_dependent_launch_on_and_off_give_bitwise_the_same_tokens(monkeypatch, checkpoints):
    """Programmatic dependent launch only lets a kernel start early; every kernel waits for
    its producers before touching memory, so graphs replayed with it give the same bits."""
    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("this GPU has no programmatic dependent launch (compute capability < 9)")
    model, dtype = checkpoints["small-bf16"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    monkeypatch.setenv(DEPENDENT_LAUNCH_ENV, "0")
    assert not pdl_enabled(torch.device("cuda"))
    plain, _, plain_replays = _generate(monkeypatch, model, dtype, True, params)
    monkeypatch.delenv(DEPENDENT_LAUNCH_ENV)
    dependent, _, replays = _generate(monkeypatch, model, dtype, True, params)
    assert plain_replays > 0 and replays > 0
    for got, want in zip(dependent, plain):
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs


def test_request_aborted_mid_decode_frees_its_blocks_with_graphs(monkeypatch, checkpoints):
    model, _ = checkpoints["tiny-fp32"]
    monkeypatch.setenv("PPRUNTIME_FORCE_CUDA_GRAPHS", "1")
    with LLM(
        model, device="cuda", kv_cache_blocks=256, max_batch_size=16, exit_workers=False
    ) as llm:
        finished, victim, others = abort_one_mid_decode(llm, PROMPTS)
        assert finished[victim].finish_reason == "abort"
        assert 5 <= len(finished[victim].token_ids) < 200
        assert all(finished[r].finish_reason == "length" for r in others)
        executor = llm._engine.executor
        assert executor.runner.num_replays > 0
        assert executor.table.blocks.num_free_blocks == executor.table.blocks.num_blocks


def test_deterministic_mode_is_bitwise_identical_with_graphs(monkeypatch, checkpoints):
    model, _ = checkpoints["small-bf16"]
    params = [
        SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=11, logprobs=3),
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
    ] * 3
    params = params[: len(PROMPTS)]
    runs = []
    for _ in range(2):
        monkeypatch.setenv("PPRUNTIME_FORCE_CUDA_GRAPHS", "1")
        with LLM(
            model,
            device="cuda",
            dtype="bfloat16",
            kv_cache_blocks=256,
            max_batch_size=16,
            deterministic=True,
            exit_workers=False,
        ) as llm:
            outputs = llm.generate([np.asarray(p) for p in PROMPTS], params, use_tqdm=False)
            assert llm._engine.executor.runner.num_replays > 0
        runs.append([(o.token_ids, o.logprobs) for o in outputs])
    assert runs[0] == runs[1]  # tokens and log-prob floats, bit for bit


# -- PP=2: two ranks sharing the GPU, activations through pinned host buffers -----------
def _cli(tmp_path, *extra: str) -> list[str]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    return [
        sys.executable,
        "-m",
        "ppruntime",
        "generate",
        "--device",
        "cuda",
        "--prompts-file",
        str(prompts),
        "--max-tokens",
        "16",
        "--json",
        "--quiet",
        "--max-batch-size",
        "16",
        "--kv-cache-blocks",
        "256",
        "--log-level",
        "INFO",
        *extra,
    ]


def _run_json(ranks: int, command: list[str], env: dict | None = None):
    result = run_mpi(ranks, command, timeout=JOB_TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def test_pp2_on_one_gpu_graphs_on_and_off_agree(tmp_path, checkpoints):
    model, _ = checkpoints["tiny-fp32"]
    command = _cli(tmp_path, "--model", model, "--ignore-eos")
    graphed, log = _run_json(2, command, FORCE_GRAPHS)
    assert log.count("captured 5 decode CUDA graphs") == 2, log[-3000:]  # each rank its own
    eager, _ = _run_json(2, [*command, "--enforce-eager"])
    single, _ = _run_json(1, command, FORCE_GRAPHS)
    tokens = [[record["token_ids"] for record in run] for run in (graphed, eager, single)]
    assert tokens[0] == tokens[1] == tokens[2]


def test_pp2_deterministic_runs_are_bitwise_identical(tmp_path, checkpoints):
    model, _ = checkpoints["small-bf16"]
    command = _cli(
        tmp_path,
        "--model",
        model,
        "--dtype",
        "bfloat16",
        "--deterministic",
        "--temperature",
        "0.8",
        "--seed",
        "5",
        "--logprobs",
        "2",
    )
    first, _ = _run_json(2, command, FORCE_GRAPHS)
    second, _ = _run_json(2, command, FORCE_GRAPHS)
    assert first == second  # JSON floats round-trip: the log-probs are equal bit for bit


# -- the pinned staging of outgoing activations -----------------------------------------
def test_pinned_staging_does_not_wait_for_the_gpu_and_keeps_send_order():
    from mpi4py import MPI

    from ppruntime.comm.activation_staging import PinnedStagingSender
    from ppruntime.comm.waiting import wait_all

    device = torch.device("cuda")
    comm = MPI.COMM_SELF
    tag = 77
    sender = PinnedStagingSender(comm, 0, tag, 2, 1 << 16, torch.bfloat16, device)
    first = torch.randn(64, 256, device=device).to(torch.bfloat16)
    second = torch.randn(32, 256, device=device).to(torch.bfloat16)
    torch.cuda._sleep(1_000_000_000)  # keep the compute stream busy for a while
    handles = [sender.send(0, first * 2), sender.send(1, second + 1)]
    # the host went on at once: the copies wait behind the sleeping kernel
    assert handles[0].request is None and handles[1].request is None
    assert not sender.all_posted()
    received = [np.empty(64 * 256, np.int16), np.empty(32 * 256, np.int16)]
    receives = [comm.Irecv([buffer, MPI.BYTE], 0, tag) for buffer in received]
    wait_all([*handles, *receives], "staged sends to self")
    for buffer, want in zip(received, (first * 2, second + 1)):
        got = torch.from_numpy(buffer).view(torch.bfloat16).view(want.shape)
        assert torch.equal(got, want.cpu())
