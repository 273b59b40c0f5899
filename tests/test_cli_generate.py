"""`ppruntime generate` as a user runs it: subprocesses, alone and under `mpirun -n 2`.

All the jobs of this module are started at once by one fixture (they are mostly
interpreter start-up) and checked by the tests below, against the Python API run
in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import REPO_ROOT, describe, kill_job, mpi_env, start_mpi, wait_mpi

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

# bad input: (file contents or None, extra flags, substrings stderr must contain)
BAD_CASES = {
    "bad-json-line": ('{"prompt": "a"}\n{"prompt": \n', [], ["{file}:2", "JSON"]),
    "missing-field": (
        '{"prompt": "a"}\n{"prompt": "b"}\n{"text": "c"}\n',
        [],
        ["{file}:3", "'prompt'", "'prompt_token_ids'"],
    ),
    "non-int-ids": ('{"prompt_token_ids": [1, "2"]}\n', [], ["{file}:1", "prompt_token_ids"]),
    "float-ids": (
        '{"prompt": "a"}\n{"prompt_token_ids": [1, 2.5]}\n',
        [],
        ["{file}:2", "prompt_token_ids"],
    ),
    "id-out-of-vocab": (
        '{"prompt": "a"}\n{"prompt_token_ids": [256, 9999]}\n',
        [],
        ["{file}:2", "prompt_token_ids", "9999"],
    ),
    "temperature": (None, ["--temperature", "-1"], ["temperature", "-1"]),
    "top-p": (None, ["--top-p", "1.5"], ["top_p", "1.5"]),
    "max-tokens-over-model-len": (
        None,
        ["--max-model-len", "32", "--max-tokens", "40"],
        ["--prompt #1", "max_tokens", "40"],
    ),
    "stop-token-ids": (None, ["--stop-token-ids", "1,x"], ["--stop-token-ids", "1,x"]),
    "missing-file": ("<missing>", [], ["--prompts-file", "missing.jsonl"]),
}
MPI_BAD_CASES = ["temperature", "id-out-of-vocab"]
# an unseeded sampled request in deterministic mode: the same bits in every process
UNSEEDED_PROMPTS = ["hello", "once upon a time"]
UNSEEDED = [
    *CLI,
    *[arg for prompt in UNSEEDED_PROMPTS for arg in ("--prompt", prompt)],
    *["--deterministic", "--temperature", "0.9", "--top-p", "0.95", "--logprobs", "3"],
    *["--ignore-eos", *JSON_FLAGS],
]


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
    contents, flags, _ = BAD_CASES[name]
    args = [*CLI, "--quiet"]
    file = ""
    if contents is None:
        args += ["--prompt", "hello"]
    else:
        file = str(directory / ("missing.jsonl" if contents == "<missing>" else f"{name}.jsonl"))
        if contents != "<missing>":
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
    }
    single.update({name: _bad_args(directory, name) for name in BAD_CASES})
    started = {name: (_start(args), file) for name, (args, file) in single.items()}
    mpi = {"mpi-json-logprobs": single["json-logprobs"]}
    mpi.update({f"mpi-{name}": single[name] for name in MPI_BAD_CASES})
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


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_exits_2_naming_line_and_field(jobs, name):
    result, file = jobs[name]
    assert result.returncode == 2, describe(result)
    assert result.stdout == "", "bad input must stop everything before generation"
    for needle in BAD_CASES[name][2]:
        needle = needle.format(file=file)
        assert needle in result.stderr, f"{needle!r} not in stderr:\n{result.stderr}"


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
    for needle in BAD_CASES[name][2]:
        assert needle.format(file=file) in result.stderr, describe(result)
