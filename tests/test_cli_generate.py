"""`ppruntime generate` as a user runs it: subprocesses, alone and under `mpirun -n 2`.

All the jobs of this module are started at once by one fixture (they are mostly
interpreter start-up) and checked by the tests below, against the Python API run
in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import (
    REPO_ROOT,
    _session_members,
    describe,
    kill_job,
    mpi_env,
    start_mpi,
    wait_mpi,
)

from ppruntime import LLM, SamplingParams

TIMEOUT_S = 120
VOCAB = 512  # the tiny preset's
# the random `tiny` (the default model is the trained one), against LLM(preset="tiny")
CLI = [sys.executable, "-m", "ppruntime", "generate", "--preset", "tiny"]

# the good prompts: --prompt first, then the file's lines (a blank line is skipped)
FLAG_PROMPT = "abc"
GOOD_FILE = (
    '{"prompt": "hello"}\n'
    "\n"
    '{"prompt_token_ids": [256, 5, 6, 7]}\n'
    '{"prompt": "once upon a time"}\n'
    '{"prompt_token_ids": [104, 105]}\n'
)
GOOD_PROMPTS = [FLAG_PROMPT, "hello", [256, 5, 6, 7], "once upon a time", [104, 105]]
JSON_FLAGS = ["--max-tokens", "12", "--quiet", "--json"]
KEYS = {"request_id", "prompt_token_ids", "token_ids", "text", "finish_reason"}

# bad input under mpirun -n 2: (file contents or None, extra flags, substrings stderr must
# contain). Each bad input to one process, and its message, is a case of CLI_CASES in
# tests/test_hostile_inputs.py (these two among them).
MPI_BAD_CASES = {
    "id-out-of-vocab": (
        '{"prompt": "a"}\n{"prompt_token_ids": [256, 9999]}\n',
        [],
        ["{file}:2", "prompt_token_ids", "9999"],
    ),
    "temperature": (None, ["--temperature", "-1"], ["temperature", "-1"]),
}
# an unseeded sampled request in deterministic mode: the same bits in every process
UNSEEDED_PROMPTS = ["hello", "once upon a time"]
UNSEEDED = [
    *CLI,
    *[arg for prompt in UNSEEDED_PROMPTS for arg in ("--prompt", prompt)],
    *["--deterministic", "--temperature", "0.9", "--top-p", "0.95", "--logprobs", "3"],
    *["--ignore-eos", *JSON_FLAGS],
]

# --output under failure: many requests, two at a time, on a slowed-down stage
MANY_PROMPTS = [[256, 5 + i, 6 + i, 7] for i in range(12)]
MANY_MAX_TOKENS = 24
MANY_FLAGS = ["--max-tokens", str(MANY_MAX_TOKENS), "--ignore-eos", "--max-batch-size", "2"]
SLOW_STAGE_MS = 40
FIRST_RESULTS = 2  # requests finished before the job is hit


def _start(args: list[str]) -> subprocess.Popen[bytes]:
    """One process, bytes out (the text may hold a lone \\r: no newline translation)."""
    return subprocess.Popen(
        args,
        cwd=str(REPO_ROOT),
        env=mpi_env({"PYTHONIOENCODING": "utf-8"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait(proc: subprocess.Popen[bytes]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stdout, stderr = kill_job(proc)
        raise AssertionError(f"timed out: {proc.args}\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, stdout.decode("utf-8"), stderr.decode("utf-8", "replace")
    )


def _bad_args(directory: Path, name: str) -> tuple[list[str], str]:
    contents, flags, _ = MPI_BAD_CASES[name]
    args = [*CLI, "--quiet"]
    file = ""
    if contents is None:
        args += ["--prompt", "hello"]
    else:
        file = str(directory / f"{name}.jsonl")
        Path(file).write_text(contents)
        args += ["--prompts-file", file]
    return [*args, *flags], file


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Every CLI run of this module, started together: name -> (CompletedProcess, file)."""
    directory = tmp_path_factory.mktemp("cli")
    good_file = directory / "prompts.jsonl"
    good_file.write_text(GOOD_FILE)
    good = [*CLI, "--prompt", FLAG_PROMPT, "--prompts-file", str(good_file), *JSON_FLAGS]
    single = {
        "text": ([*CLI, "--preset", "tiny", "--prompt", "hello", "--max-tokens", "16"], ""),
        "text-two": ([*CLI, "--prompt", "hello", "--prompt", "abc", "--max-tokens", "5"], ""),
        "json": (good, str(good_file)),
        "json-logprobs": ([*good, "--logprobs", "2"], str(good_file)),
        "stream": ([*CLI, "--prompt", "hello", "--max-tokens", "16", "--stream"], ""),
        "stream-json": ([*good, "--stream"], str(good_file)),
        "unseeded-a": (UNSEEDED, ""),
        "unseeded-b": (UNSEEDED, ""),
        "json-output": ([*good, "--output", str(directory / "out.jsonl")], str(good_file)),
        "stream-output": (
            [*good, "--stream", "--output", str(directory / "out-stream.jsonl")],
            str(good_file),
        ),
    }
    started = {name: (_start(args), file) for name, (args, file) in single.items()}
    mpi = {"mpi-json-logprobs": single["json-logprobs"]}
    mpi.update({f"mpi-{name}": _bad_args(directory, name) for name in MPI_BAD_CASES})
    mpi.update({f"mpi-unseeded-{run}": (UNSEEDED, "") for run in "ab"})
    started_mpi = {}
    try:
        results = {name: (_wait(proc), file) for name, (proc, file) in started.items()}
        # under mpirun after the rest, so that the 2 cores are not oversubscribed tenfold
        for name, (args, file) in mpi.items():
            started_mpi[name] = (start_mpi(2, args, env={"PYTHONIOENCODING": "utf-8"}), file)
        for name, (proc, file) in started_mpi.items():
            results[name] = (wait_mpi(proc, TIMEOUT_S), file)
    finally:
        for proc, _ in [*started.values(), *started_mpi.values()]:
            if proc.poll() is None:
                kill_job(proc)
    return results


@pytest.fixture(scope="module")
def api():
    """The same prompts through the Python API in this process."""
    with LLM(preset="tiny", deterministic=True) as llm:
        outputs = {
            "text": llm.generate(["hello"], SamplingParams(max_tokens=16, temperature=0)),
            "text-two": llm.generate(["hello", "abc"], SamplingParams(max_tokens=5, temperature=0)),
            "json": llm.generate(GOOD_PROMPTS, SamplingParams(max_tokens=12, temperature=0)),
            "json-logprobs": llm.generate(
                GOOD_PROMPTS, SamplingParams(max_tokens=12, temperature=0, logprobs=2)
            ),
            "many": llm.generate(
                MANY_PROMPTS,
                SamplingParams(max_tokens=MANY_MAX_TOKENS, temperature=0, ignore_eos=True),
            ),
        }
        outputs["unseeded-greedy"] = llm.generate(
            UNSEEDED_PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        )
        encoded = [llm.encode_prompt(prompt).tolist() for prompt in GOOD_PROMPTS]
    return outputs, encoded


def _ok(jobs, name) -> subprocess.CompletedProcess[str]:
    result, _ = jobs[name]
    assert result.returncode == 0, describe(result)
    return result


def _json_lines(result) -> list[dict]:
    records = []
    for line in result.stdout.splitlines():
        record = json.loads(line)  # every line of stdout is one JSON object
        assert isinstance(record, dict), line
        records.append(record)
    return records


def test_plain_text(jobs, api):
    outputs, _ = api
    result = _ok(jobs, "text")
    assert result.stdout == f"[--prompt #1] {outputs['text'][0].text}\n"


def test_plain_text_several_prompts_in_order(jobs, api):
    outputs, _ = api
    result = _ok(jobs, "text-two")
    expected = "".join(
        f"[--prompt #{i + 1}] {output.text}\n" for i, output in enumerate(outputs["text-two"])
    )
    assert result.stdout == expected


def test_stream_prints_the_text(jobs, api):
    outputs, _ = api
    assert _ok(jobs, "stream").stdout == outputs["text"][0].text + "\n"


def test_stream_json_equals_json(jobs):
    assert _json_lines(_ok(jobs, "stream-json")) == _json_lines(_ok(jobs, "json"))


@pytest.mark.parametrize("name", ["json", "json-logprobs"])
def test_json_one_object_per_request_in_input_order(jobs, api, name):
    outputs, encoded = api
    records = _json_lines(_ok(jobs, name))
    assert len(records) == len(GOOD_PROMPTS)
    wants_logprobs = name == "json-logprobs"
    assert len({record["request_id"] for record in records}) == len(records)
    for record, output, prompt_ids in zip(records, outputs[name], encoded):
        assert set(record) == (KEYS | {"logprobs"} if wants_logprobs else KEYS)
        assert record["prompt_token_ids"] == prompt_ids
        assert record["token_ids"] == output.token_ids
        assert record["text"] == output.text
        assert record["finish_reason"] == output.finish_reason == "length"
        if wants_logprobs:
            assert len(record["logprobs"]) == len(record["token_ids"])
            for step, token, expected in zip(
                record["logprobs"], record["token_ids"], output.logprobs
            ):
                assert str(token) in step and len(step) <= 3
                assert {int(key) for key in step} == set(expected)
                for key, value in step.items():
                    assert value == pytest.approx(expected[int(key)], rel=1e-5, abs=1e-5)


def test_mpi_two_ranks_json_equals_single_process(jobs):
    """Same records; log-probs equal up to float rounding (PP=2 batches the requests
    differently, so a row's matmuls may round differently in the last bits)."""
    single = _json_lines(_ok(jobs, "json-logprobs"))
    under_mpi = _json_lines(_ok(jobs, "mpi-json-logprobs"))
    assert len(under_mpi) == len(single)
    for ours, theirs in zip(under_mpi, single):
        assert {k: v for k, v in ours.items() if k != "logprobs"} == {
            k: v for k, v in theirs.items() if k != "logprobs"
        }
        assert len(ours["logprobs"]) == len(theirs["logprobs"])
        for step, expected in zip(ours["logprobs"], theirs["logprobs"]):
            assert step.keys() == expected.keys()
            for key, value in step.items():
                assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-5)


def test_deterministic_unseeded_sampling_is_bitwise_identical_across_processes(jobs, api):
    """temperature > 0 without a seed, --deterministic: two separate processes give the
    same tokens and log-probs to the bit (JSON floats round-trip exactly), and so do two
    `mpirun -n 2` jobs, whose tokens are those of the single processes."""
    outputs, _ = api
    first, second = (_json_lines(_ok(jobs, f"unseeded-{run}")) for run in "ab")
    assert len(first) == len(UNSEEDED_PROMPTS)
    assert first == second, "two processes sampled differently"
    mpi_first, mpi_second = (_json_lines(_ok(jobs, f"mpi-unseeded-{run}")) for run in "ab")
    assert mpi_first == mpi_second, "two mpirun -n 2 jobs sampled differently"
    assert [r["token_ids"] for r in mpi_first] == [r["token_ids"] for r in first]
    # it did sample: not the greedy tokens
    greedy = [output.token_ids for output in outputs["unseeded-greedy"]]
    assert [r["token_ids"] for r in first] != greedy
    for record in first:
        assert len(record["token_ids"]) == 12 and len(record["logprobs"]) == 12


@pytest.mark.parametrize("name", MPI_BAD_CASES)
def test_mpi_two_ranks_bad_input_exits_2(jobs, name):
    result, file = jobs[f"mpi-{name}"]
    assert result.returncode == 2, describe(result)
    assert result.stdout == ""
    for needle in MPI_BAD_CASES[name][2]:
        assert needle.format(file=file) in result.stderr, describe(result)


# =====================================================================================
# --output FILE: every finished request survives the job
# =====================================================================================
def _read_results(path: Path) -> list[dict]:
    """Every line of an --output file is one JSON object (a half line fails here)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(isinstance(record, dict) for record in records)
    return records


@pytest.mark.parametrize("name", ["json-output", "stream-output"])
def test_output_file_holds_the_json_records_in_input_order(jobs, name):
    result = _ok(jobs, name)
    stdout_records = _json_lines(result)  # stdout --json is unchanged by --output
    assert len(stdout_records) == len(GOOD_PROMPTS)
    path = Path(result.args[result.args.index("--output") + 1])
    records = _read_results(path)
    assert records == [{"index": i, **record} for i, record in enumerate(stdout_records)]
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary file left


def _start_many(n: int, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """MANY_PROMPTS on n ranks (n=1: no mpirun), the last stage slowed, with --output."""
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in MANY_PROMPTS))
    output = tmp_path / "results.jsonl"
    args = [*CLI, "--prompts-file", str(prompts), *MANY_FLAGS, "--quiet", "--json"]
    args += ["--output", str(output)]
    env = {"PPRUNTIME_STAGE_DELAY_MS": f"{n - 1}:{SLOW_STAGE_MS}", "PYTHONIOENCODING": "utf-8"}
    if n > 1:
        return start_mpi(n, args, env=env), output
    proc = subprocess.Popen(
        args,
        cwd=str(REPO_ROOT),
        env=mpi_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return proc, output


def _wait_for_results(proc: subprocess.Popen, path: Path, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        if proc.poll() is not None or time.monotonic() > deadline:
            stdout, stderr = kill_job(proc)
            raise AssertionError(f"{count} results not seen in {path}:\n{stdout}\n{stderr}")
        time.sleep(0.1)


def _rank_pid(session: int, rank: int) -> int:
    """The pid of MPI rank `rank` of the job in session `session`."""
    for pid in _session_members(session):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        ranks = {b"OMPI_COMM_WORLD_RANK=%d" % rank, b"PMI_RANK=%d" % rank}
        if b"ppruntime" in cmdline and ranks & set(environ):
            return pid
    raise AssertionError(f"rank {rank} not found in session {session}")


def _check_partial_results(path: Path, api, at_least: int) -> list[dict]:
    """The records are valid, distinct, and what the Python API generates."""
    outputs, _ = api
    records = _read_results(path)
    assert len(records) >= at_least, records
    assert len({record["index"] for record in records}) == len(records)
    for record in records:
        expected = outputs["many"][record["index"]]
        assert set(record) == KEYS | {"index"}
        if record["finish_reason"] == "length":
            assert record["token_ids"] == expected.token_ids
        else:  # aborted by SIGTERM: what it had
            assert record["finish_reason"] == "abort", record
            assert record["token_ids"] == expected.token_ids[: len(record["token_ids"])]
    return records


def test_output_file_keeps_finished_requests_when_a_rank_is_killed(tmp_path, api):
    proc, path = _start_many(2, tmp_path)
    try:
        _wait_for_results(proc, path, FIRST_RESULTS)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        result = wait_mpi(proc, TIMEOUT_S)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert result.returncode != 0, describe(result)
    records = _check_partial_results(path, api, FIRST_RESULTS)
    finished = [record for record in records if record["finish_reason"] == "length"]
    assert FIRST_RESULTS <= len(finished) < len(MANY_PROMPTS), records
    # (rank 0 may also have ended waiting requests with "abort" on mpirun's SIGTERM)


@pytest.mark.parametrize("n", [1, 2], ids=["ppruntime-alone", "mpirun-2-ranks"])
def test_output_file_is_complete_and_ordered_after_sigterm(tmp_path, api, n):
    """SIGTERM (Slurm's time limit) to the ppruntime process, or to mpirun (which
    forwards it): the running requests end with "abort" and the file is rewritten in
    input order with every request, the finished ones complete."""
    proc, path = _start_many(n, tmp_path)
    try:
        _wait_for_results(proc, path, FIRST_RESULTS)
        proc.send_signal(signal.SIGTERM)
        result = wait_mpi(proc, TIMEOUT_S)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    if n == 1:
        assert result.returncode == 143, describe(result)
    records = _check_partial_results(path, api, len(MANY_PROMPTS))
    assert [record["index"] for record in records] == list(range(len(MANY_PROMPTS)))
    reasons = [record["finish_reason"] for record in records]
    assert reasons.count("length") >= FIRST_RESULTS and "abort" in reasons, reasons
