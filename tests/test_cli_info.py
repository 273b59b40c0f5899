"""`ppruntime info`, alone and under mpirun, and the launcher-mismatch warning."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from launching import REPO_ROOT, describe, mpi_env, ppruntime_cmd, run_mpi

from ppruntime.comm import mpi_env as mpi_env_module
from ppruntime.comm.mpi_env import RankInfo


def test_info_single_process() -> None:
    result = subprocess.run(
        [*ppruntime_cmd(), "info"],
        capture_output=True,
        text=True,
        timeout=60,
        env=mpi_env(),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, describe(result)
    assert re.search(r"world size:\s+1\n", result.stdout), describe(result)
    assert "rank 0:" in result.stdout, describe(result)


def test_info_two_ranks() -> None:
    result = run_mpi(2, [*ppruntime_cmd(), "info"], timeout=60)
    assert result.returncode == 0, describe(result)
    assert re.search(r"world size:\s+2\n", result.stdout), describe(result)
    assert "rank 0:" in result.stdout and "rank 1:" in result.stdout, describe(result)
    assert result.stdout.count("MPI library:") == 1, describe(result)  # rank 0 prints
    assert "WARNING" not in result.stdout, describe(result)
    # which activation channel each neighbouring pair would use (CPU ranks: host)
    assert "activation channel: host (requested auto)" in result.stdout, describe(result)
    assert "rank 0 -> rank 1: host" in result.stdout, describe(result)


def test_info_names_the_refusal_of_an_impossible_activation_channel() -> None:
    env = {"PPRUNTIME_ACTIVATION_CHANNEL": "nccl", "PPRUNTIME_DEVICE": "cpu"}
    result = run_mpi(2, [*ppruntime_cmd(), "info", "--json"], timeout=60, env=env)
    assert result.returncode == 0, describe(result)
    channels = json.loads(result.stdout)["activation_channels"]
    assert channels["requested"] == "nccl", channels
    assert channels["chosen"].startswith("refused: activation channel 'nccl' needs a CUDA"), (
        channels
    )
    assert channels["pairs_auto"] == ["rank 0 -> rank 1: host"], channels


def test_info_json_two_ranks() -> None:
    result = run_mpi(2, [*ppruntime_cmd(), "info", "--json"], timeout=60)
    assert result.returncode == 0, describe(result)
    summary = json.loads(result.stdout)
    assert summary["world_size"] == 2
    assert [rank["rank"] for rank in summary["ranks"]] == [0, 1]
    assert summary["thread_level_granted"] == "MPI_THREAD_MULTIPLE"
    assert "warning" not in summary


def _singleton() -> RankInfo:
    return RankInfo(
        rank=0,
        size=1,
        local_rank=0,
        local_size=1,
        host="h",
        thread_level_requested=3,
        thread_level_provided=3,
    )


@pytest.fixture
def no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in mpi_env_module._LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launcher_mismatch_warning(no_launcher_env: pytest.MonkeyPatch) -> None:
    info = _singleton()
    assert mpi_env_module.launcher_mismatch_warning(info) is None
    no_launcher_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    warning = mpi_env_module.launcher_mismatch_warning(info)
    assert warning is not None
    assert "world size is 1" in warning and "2 ranks" in warning
    assert "mpirun" in warning


def test_no_mismatch_warning_when_sizes_agree(no_launcher_env: pytest.MonkeyPatch) -> None:
    no_launcher_env.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert mpi_env_module.launcher_mismatch_warning(_singleton()) is None
