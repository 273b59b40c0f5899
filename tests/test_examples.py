"""Every file of examples/ runs as it stands, from the repository root, as a user runs it.

All the runs start at once from one fixture (they are mostly interpreter start-up):
offline_batch.py under `mpirun -n 2`, streaming.py alone, and the deterministic suite
three times (as shipped; a copy with a wrong golden value; a copy regenerating its
golden file). examples/slurm/ is run by tests/test_slurm.py (launch/slurm.sbatch
with examples/prompts.jsonl, its default).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launching import REPO_ROOT, describe, kill_job, mpi_env, start_mpi, wait_mpi

TIMEOUT_S = 180
EXAMPLES = REPO_ROOT / "examples"
PROMPTS = [json.loads(line) for line in (EXAMPLES / "prompts.jsonl").read_text().splitlines()]
KNOWN_WORDS = set(
    re.findall(r"[a-z]+", (REPO_ROOT / "data/kjv/genesis-matthew.txt").read_text().lower())
)


def _start(args: list[str], cwd: Path = REPO_ROOT) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=str(cwd),
        env=mpi_env({"PYTHONIOENCODING": "utf-8"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _suite_copy(directory: Path, tamper: bool) -> Path:
    suite = directory / ("tampered" if tamper else "regenerated")
    shutil.copytree(EXAMPLES / "deterministic_suite", suite)
    golden_path = suite / "golden.json"
    golden = json.loads(golden_path.read_text())
    first = next(iter(golden.values()))
    if tamper:
        first["token_ids"][3] += 1
    else:
        first["logprobs"][0][0][1] += 0.5  # --update-golden must rewrite it
    golden_path.write_text(json.dumps(golden))
    return suite


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    directory = tmp_path_factory.mktemp("examples")
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    started = {
        "streaming": _start([sys.executable, "examples/streaming.py"]),
        "suite": _start([*pytest_cmd, "examples/deterministic_suite"]),
        "suite-tampered": _start(
            [*pytest_cmd, str(_suite_copy(directory, tamper=True))], directory
        ),
        "suite-update": _start(
            [*pytest_cmd, str(_suite_copy(directory, tamper=False)), "--update-golden"], directory
        ),
    }
    output = directory / "outputs.jsonl"
    offline = ["python", "examples/offline_batch.py", "examples/prompts.jsonl", str(output)]
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        mpi = start_mpi(2, [sys.executable, *offline[1:]], env={"PYTHONIOENCODING": "utf-8"})
        results["offline"] = wait_mpi(mpi, TIMEOUT_S)
        for name, proc in started.items():
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in started.values():
            if proc.poll() is None:
                kill_job(proc)
    results["offline"].output_file = output  # type: ignore[attr-defined]
    results["suite-update"].golden = (  # type: ignore[attr-defined]
        directory / "regenerated" / "golden.json"
    )
    return results


def _reads_as_words(text: str) -> bool:
    words = re.findall(r"[a-z]+", text.lower())[:-1]  # the last word may be cut off
    return len(words) >= 3 and sum(w in KNOWN_WORDS for w in words) >= 0.9 * len(words)


def test_offline_batch_writes_one_line_per_prompt_in_order(runs) -> None:
    result = runs["offline"]
    assert result.returncode == 0, describe(result)
    assert f"wrote {len(PROMPTS)} outputs to {result.output_file}" in result.stdout
    records = [json.loads(line) for line in result.output_file.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(PROMPTS)))
    for record, prompt in zip(records, PROMPTS):
        assert record["prompt_token_ids"][1:] == list(prompt["prompt"].encode()), record
        assert record["finish_reason"] == "length" and len(record["token_ids"]) == 32, record
        assert _reads_as_words(record["text"]), record["text"]


def test_streaming_prints_deltas_and_aborts_one_request_midway(runs) -> None:
    result = runs["streaming"]
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    deltas: dict[str, str] = {"req-0": "", "req-1": ""}
    order = []  # (request, event) as printed
    for line in lines:
        match = re.fullmatch(r"\[(req-\d)\] (finished: \w+|'.*'|\".*\")", line)
        if match:
            request, rest = match.groups()
            if rest.startswith("finished"):
                order.append((request, rest))
            else:
                deltas[request] += ast.literal_eval(rest)
                order.append((request, "delta"))
    summary = {
        m[0]: m[1:]
        for m in re.findall(r"^(req-\d): (\w+) after (\d+) tokens: (.*)$", result.stdout, re.M)
    }
    assert summary["req-0"][:2] == ("length", "48"), result.stdout
    reason, tokens, text = summary["req-1"]
    assert reason == "abort" and 8 <= int(tokens) < 48, result.stdout
    for request in ("req-0", "req-1"):
        assert deltas[request] == ast.literal_eval(summary[request][2])  # deltas add up
    assert len(deltas["req-0"]) > 1 and _reads_as_words(deltas["req-0"]), deltas
    aborted_at = order.index(("req-1", "finished: abort"))
    # midway: the other request streamed on after the abort
    assert ("req-0", "delta") in order[aborted_at:], order
    assert order[-1] == ("req-0", "finished: length"), order


def test_deterministic_suite_passes_against_its_golden_file(runs) -> None:
    result = runs["suite"]
    assert result.returncode == 0, describe(result)
    assert "4 passed" in result.stdout, result.stdout


def test_deterministic_suite_fails_on_a_wrong_golden_token(runs) -> None:
    result = runs["suite-tampered"]
    assert result.returncode == 1, describe(result)
    assert "1 failed, 3 passed" in result.stdout, result.stdout
    assert "test_matches_golden[In the beginning]" in result.stdout, result.stdout


def test_update_golden_rewrites_the_golden_file(runs) -> None:
    result = runs["suite-update"]
    assert result.returncode == 0, describe(result)
    shipped = json.loads((EXAMPLES / "deterministic_suite" / "golden.json").read_text())
    assert json.loads(result.golden.read_text()) == shipped
