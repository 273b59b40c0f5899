"""Bad arguments are reported before MPI starts and before torch is imported.

One fresh interpreter runs `ppruntime.cli.main` on each bad argv of CASES and records
the exit status, stderr and whether `torch` or `mpi4py.MPI` got imported: none may be
(a module-level heavy import in the parser or the checks fails this). A second one
runs the same cases with PPRUNTIME_LOG_DIR set, which sends them through the check
after MPI (the one used when an error can differ between ranks): the messages and
statuses must be the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from launching import REPO_ROOT, describe, mpi_env, ppruntime_cmd, run_mpi

from ppruntime.api import early_errors
from ppruntime.comm import launcher

TIMEOUT_S = 120
HEAVY_MODULES = ("torch", "mpi4py.MPI")

# name -> argv after `ppruntime` ({dir} is a temporary directory)
CASES = {
    "max-tokens": ["generate", "--prompt", "hi", "--max-tokens", "-1"],
    "temperature": ["generate", "--prompt", "hi", "--temperature", "nan"],
    "top-p": ["generate", "--prompt", "hi", "--top-p", "0"],
    "seed": ["generate", "--prompt", "hi", "--seed", "-3"],
    "stop-token-ids": ["generate", "--prompt", "hi", "--stop-token-ids", "1,x"],
    "no-prompts": ["generate", "--max-tokens", "3"],
    "prompt-surrogate": ["generate", "--prompt", "a\udcff"],
    "prompts-file-missing": ["generate", "--prompts-file", "{dir}/missing.jsonl"],
    "prompts-file-bad-json": ["generate", "--prompts-file", "{dir}/bad.jsonl"],
    "output-is-dir": ["generate", "--prompt", "hi", "--output", "{dir}"],
    "serve-port": ["serve", "--port", "70000"],
    "serve-nice": ["serve", "--http-nice", "25"],
    "argparse-int": ["generate", "--prompt", "hi", "--max-tokens", "abc"],
    "info-argparse": ["info", "--pp-size", "two"],
}

RUNNER = """
import contextlib, json, sys, tempfile
from ppruntime.cli import main
results = {}
stderr = tempfile.TemporaryFile("w+")  # a real file: bootstrap hands it to faulthandler
for name, argv in json.loads(sys.argv[1]).items():
    stderr.seek(0)
    stderr.truncate()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    stderr.seek(0)
    lines = stderr.read().strip().splitlines()
    results[name] = {
        "code": code,
        "message": lines[-1] if lines else "",
        "heavy": [m for m in %r if m in sys.modules],
    }
print(json.dumps(results))
"""


def _run_cases(workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    cases = {
        name: [arg.replace("{dir}", str(workdir)) for arg in argv] for name, argv in CASES.items()
    }
    command = [sys.executable, "-c", RUNNER % (HEAVY_MODULES,), json.dumps(cases)]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=mpi_env(env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, Any], dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("fast-errors")
    (workdir / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "oops"\n')
    fast = _run_cases(workdir, {})
    slow = _run_cases(workdir, {"PPRUNTIME_LOG_DIR": str(workdir / "logs")})
    return fast, slow


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_is_reported_without_torch_or_mpi(name: str, runs) -> None:
    fast, slow = runs
    result = fast[name]
    assert result["code"] == 2, result
    assert "error:" in result["message"], result
    assert result["heavy"] == [], f"{name}: imported {result['heavy']} before reporting"


@pytest.mark.parametrize("name", list(CASES))
def test_early_message_matches_the_check_after_mpi(name: str, runs) -> None:
    fast, slow = runs
    assert "mpi4py.MPI" in slow["max-tokens"]["heavy"]  # the oracle did go through MPI
    assert fast[name]["code"] == slow[name]["code"]
    assert fast[name]["message"] == slow[name]["message"]


def test_expected_messages(runs) -> None:
    fast, _ = runs
    assert fast["max-tokens"]["message"] == (
        "ppruntime generate: error: SamplingParams.max_tokens must be >= 1, got -1"
    )
    assert fast["serve-port"]["message"] == (
        "ppruntime serve: error: --port must be in [0, 65535], got 70000"
    )
    assert "bad.jsonl:2: not valid JSON" in fast["prompts-file-bad-json"]["message"]


def _clear_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in launcher.LAUNCHER_SIZE_VARIABLES + launcher.LAUNCHER_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_files_are_checked_early_only_when_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_launcher(monkeypatch)
    assert launcher.started_alone()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert launcher.started_alone()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert not launcher.started_alone()  # a file may read differently on another rank
    _clear_launcher(monkeypatch)
    monkeypatch.setenv("PMI_RANK", "0")  # a launcher that gives only the rank
    assert not launcher.started_alone()


def test_under_mpirun_rank_0_reports_without_mpi() -> None:
    """Every rank stops before MPI_Init; rank 0's message gets out once (the others wait
    for it rather than let the launcher end the job first)."""
    result = run_mpi(
        2,
        [*ppruntime_cmd(), "generate", "--prompt", "hi", "--max-tokens", "-1"],
        timeout=TIMEOUT_S,
        env={"PYTHONPROFILEIMPORTTIME": "1"},  # every rank's imports, on stderr
    )
    assert result.returncode == 2, describe(result)
    message = "ppruntime generate: error: SamplingParams.max_tokens must be >= 1, got -1"
    assert result.stderr.count(message) == 1, describe(result)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "ppruntime.cli" in imported, describe(result)
    assert not imported & set(HEAVY_MODULES), describe(result)


def test_only_rank_0_prints(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _clear_launcher(monkeypatch)
    waits = []
    monkeypatch.setattr(early_errors.time, "sleep", waits.append)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert early_errors.report_early("generate", "bad") == 2
    assert capsys.readouterr().err == ""
    assert waits == [early_errors.OTHER_RANKS_LINGER_S]  # rank 0 prints and exits first
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    assert early_errors.report_early("generate", "bad") == 2
    assert capsys.readouterr().err == "ppruntime generate: error: bad\n"


def test_settings_that_can_fail_take_the_mpi_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PPRUNTIME_LOG_DIR", "PPRUNTIME_LOG_LEVEL", "PPRUNTIME_TORCH_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert early_errors.bootstrap_would_pass(None, None)
    assert early_errors.bootstrap_would_pass("debug", None)
    assert not early_errors.bootstrap_would_pass("loud", None)
    assert not early_errors.bootstrap_would_pass(None, "/tmp/logs")
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    assert not early_errors.bootstrap_would_pass(None, None)
