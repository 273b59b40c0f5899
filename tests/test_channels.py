"""Activation channels (ppruntime/comm/channels): the choice, and host vs gloo end to end.

One MPI job per pipeline size runs tests/mpi_scenarios.py's `channels` scenario (a
llama tiny checkpoint; engines over the host and the gloo channel, deterministic and
async, one after the other), so start-up is paid once per size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mpi_scenarios as scen
import pytest
from launching import REPO_ROOT, describe, ppruntime_cmd, run_mpi
from model_fixtures import load_reference_model, make_tiny_checkpoint
from reference_compare import compare_greedy, hf_greedy_reference

from ppruntime.comm.channels import RankDevice, choose_channel, describe_pairs
from ppruntime.config import ConfigError, EngineConfig

JOB_TIMEOUT_S = 240
pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + 60)
ARCH = "llama"
CHANNELS = ("host", "gloo")
JOBS = {"pp1": (1, None, "host"), "pp2": (2, "3,2", "host,gloo"), "pp3": (3, "1,3,1", "host,gloo")}


# ------------------------------------------------------------------------------------
# the choice (pure)
# ------------------------------------------------------------------------------------
def _cpu(rank: int, host: str = "a") -> RankDevice:
    return RankDevice(rank, host, "cpu", "", "no")


def _gpu(rank: int, gpu: str, host: str = "a", cuda_aware: str = "no") -> RankDevice:
    return RankDevice(rank, host, "cuda", gpu, cuda_aware)


def test_auto_picks_nccl_only_between_distinct_gpus() -> None:
    assert choose_channel("auto", [_cpu(0), _cpu(1)]) == "host"
    assert choose_channel("auto", [_gpu(0, "0"), _gpu(1, "1")]) == "nccl"
    assert choose_channel("auto", [_gpu(0, "0"), _gpu(1, "0", host="b")]) == "nccl"
    assert choose_channel("auto", [_gpu(0, "0"), _gpu(1, "0")]) == "host"  # a shared GPU
    assert choose_channel("auto", [_gpu(0, "0"), _gpu(1, "1"), _gpu(2, "1")]) == "host"
    assert describe_pairs([_gpu(0, "0"), _gpu(1, "1"), _gpu(2, "1")]) == [
        "rank 0 -> rank 1: nccl",
        "rank 1 -> rank 2: host",
    ]


def test_explicit_channels_are_refused_where_they_cannot_work() -> None:
    assert choose_channel("gloo", [_cpu(0), _cpu(1)]) == "gloo"
    assert choose_channel("host", [_gpu(0, "0"), _gpu(1, "1")]) == "host"
    with pytest.raises(ConfigError, match=r"'nccl' needs a CUDA device.*\[0, 1\].*gloo"):
        choose_channel("nccl", [_cpu(0), _cpu(1)])
    with pytest.raises(ConfigError, match=r"sharing one GPU.*\(0, 1\)"):
        choose_channel("nccl", [_gpu(0, "0"), _gpu(1, "0")])
    with pytest.raises(ConfigError, match=r"'gloo' moves CPU tensors.*\[1\]"):
        choose_channel("gloo", [_cpu(0), _gpu(1, "0")])
    good = [_gpu(0, "0", cuda_aware="yes"), _gpu(1, "1", cuda_aware="yes")]
    assert choose_channel("cuda-aware-mpi", good) == "cuda-aware-mpi"
    with pytest.raises(ConfigError, match=r"--activation-channel.*use 'host'"):
        choose_channel("cuda-aware-mpi", [good[0], _gpu(1, "1", cuda_aware="unknown")])


def test_engine_config_names_the_bad_channel() -> None:
    with pytest.raises(ConfigError, match=r"activation_channel.*--activation-channel.*'mpi'"):
        EngineConfig(activation_channel="mpi")


def test_cuda_aware_mpi_is_refused_on_cpu_with_the_flag_and_an_alternative() -> None:
    args = [*ppruntime_cmd(), "generate", "--preset", "tiny", "--prompt", "hi"]
    args += ["--max-tokens", "2", "--activation-channel", "cuda-aware-mpi"]
    result = run_mpi(2, args, timeout=JOB_TIMEOUT_S, env={"PPRUNTIME_DEVICE": "cpu"})
    output = result.stdout + result.stderr
    assert result.returncode != 0, describe(result)
    assert "activation channel 'cuda-aware-mpi' needs CUDA devices" in output, describe(result)
    assert "use 'host'" in output, describe(result)
    assert "Traceback" not in output, describe(result)


# ------------------------------------------------------------------------------------
# host and gloo end to end
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("channel_ckpts")
    make_tiny_checkpoint(root, ARCH)
    return root


@pytest.fixture(scope="module")
def reference(ckpt_root):
    return hf_greedy_reference(
        load_reference_model(ckpt_root / ARCH), scen.greedy_prompts(), scen.GREEDY_MAX_TOKENS
    )


@pytest.fixture(scope="module")
def results(ckpt_root, tmp_path_factory):
    cache: dict[str, dict] = {}
    out_dir = tmp_path_factory.mktemp("channel_jobs")

    def get(name: str) -> dict:
        if name not in cache:
            n, partition, channels = JOBS[name]
            out = out_dir / f"{name}.json"
            args = [sys.executable, str(REPO_ROOT / "tests" / "mpi_scenarios.py")]
            args += ["--scenario", "channels", "--ckpt-root", str(ckpt_root), "--out", str(out)]
            args += ["--archs", ARCH, "--channels", channels]
            if partition:
                args += ["--layer-partition", partition]
            env = {"PPRUNTIME_DEVICE": "cpu", "PPRUNTIME_TORCH_THREADS": "1"}
            result = run_mpi(n, args, timeout=JOB_TIMEOUT_S, env=env)
            assert result.returncode == 0 and out.exists(), describe(result)
            cache[name] = json.loads(out.read_text())["channels"]
        return cache[name]

    return get


def _tokens(record: dict) -> list[list[int]]:
    return [r["token_ids"] for r in record["greedy"]]


@pytest.mark.parametrize("job", ["pp2", "pp3"])
def test_host_and_gloo_give_the_tokens_of_pp1_and_transformers(results, reference, job) -> None:
    pp1 = results("pp1")
    problems = []
    for channel in CHANNELS:
        for mode in scen.MODES:
            record = results(job)[f"{ARCH}/{channel}/{mode}"]
            assert record["channel"] == channel, record["channel"]  # the one asked for ran
            tokens = _tokens(record)
            if tokens != _tokens(pp1[f"{ARCH}/host/{mode}"]):
                problems.append(f"{job} {channel} {mode}: tokens differ from PP=1")
            mismatches = compare_greedy(
                reference.tokens,
                reference.top2_logprobs,
                tokens,
                reference_top2_ids=reference.top2_ids,
            )
            problems += [f"{job} {channel} {mode}: {m}" for m in mismatches]
            for report in record["reports"]:
                assert report["kv_blocks_free"] == report["kv_blocks_total"], report
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("job", ["pp2", "pp3"])
def test_deterministic_runs_are_bitwise_identical_across_channels(results, job) -> None:
    host = results(job)[f"{ARCH}/host/det"]["greedy"]
    gloo = results(job)[f"{ARCH}/gloo/det"]["greedy"]
    assert [r["token_ids"] for r in host] == [r["token_ids"] for r in gloo]
    # log-probs as JSON floats (repr round-trips exactly): equal to the last bit
    assert [r["logprobs"] for r in host] == [r["logprobs"] for r in gloo]
