"""Edge cases found in review: start-up failure on one rank, a paused caller, relay
handles in deterministic mode, prompt logits of a sequence preempted mid-prefill."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from launching import REPO_ROOT, run_mpi

from ppruntime import LLM, SamplingParams

SCRIPTS = REPO_ROOT / "tests" / "edge_scripts"
ENV = {"PYTHONPATH": str(REPO_ROOT)}


def _job(n: int, script: str, *args: str, timeout: float = 120):
    result = run_mpi(n, [sys.executable, str(SCRIPTS / script), *args], timeout, env=ENV)
    return result, result.stdout + result.stderr


def test_startup_failure_on_one_rank_raises_everywhere_without_abort():
    result, output = _job(2, "startup_failure.py")
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        # the allocation failure is named as a setting to change, with the original error
        assert re.search(
            rf"rank {rank} caught StartupError: .*rank 1: ConfigError: a KV cache of \d+ blocks "
            r"needs .* could not be allocated \(simulated: the KV cache does not fit",
            output,
        ), output[-3000:]
    assert "MPI_ERR" not in output and "FATAL" not in output


def test_watchdog_does_not_abort_while_rank0_caller_is_paused():
    result, output = _job(2, "paused_caller.py", "4")
    assert result.returncode == 0, output[-3000:]
    assert "tokens 120 free [True, True]" in result.stdout
    assert "caller has not stepped the engine" in output  # the watchdog looked, and waited


@pytest.mark.parametrize("n", [2, 3])
def test_deterministic_relay_releases_send_handles(n):
    result, output = _job(n, "deterministic_relay_handles.py")
    assert result.returncode == 0, output[-3000:]
    batches = int(re.search(r"rank 0 batches (\d+)", output).group(1))
    held = [int(h) for h in re.findall(r"held (\d+)", output)]
    assert len(held) == n and batches > 20
    assert max(held) <= 2, output  # at most the last sends still draining, not one per batch


def test_prompt_logits_complete_when_preempted_mid_prefill():
    params = SamplingParams(max_tokens=30, ignore_eos=True, prompt_logits=True, temperature=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 200, size=int(rng.integers(20, 70))) for _ in range(6)]
    outputs = {}
    for name, kwargs in {"roomy": {}, "scarce": {"kv_cache_blocks": 24}}.items():
        with LLM(
            preset="tiny",
            max_model_len=128,
            block_size=8,
            max_num_tokens=40,
            max_batch_size=4,
            exit_workers=False,
            **kwargs,
        ) as llm:
            outputs[name] = llm.generate(prompts, params)
            preemptions = llm._executor.scheduler.num_preemptions
        if name == "scarce":
            assert preemptions > 0
    for prompt, roomy, scarce in zip(prompts, outputs["roomy"], outputs["scarce"]):
        assert scarce.prompt_logits.shape == (len(prompt), roomy.prompt_logits.shape[1])
        np.testing.assert_allclose(scarce.prompt_logits, roomy.prompt_logits, atol=1e-4)
        assert scarce.token_ids == roomy.token_ids


def test_ranks_with_different_configurations_refuse_to_start():
    """A different flag, then a different PPRUNTIME_DETERMINISTIC, on rank 1."""
    result, output = _job(2, "different_config.py")
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        for source in ("", " from the environment"):
            assert (
                f"rank {rank} caught ConfigError{source}: ranks [1] were started with a "
                "configuration"
            ) in output, output[-3000:]
