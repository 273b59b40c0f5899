"""Every input a user can get wrong gets a clear error naming the field and the value.

One table per level:
- REQUEST_CASES: `LLM.add_request` in-process (PP=1); a request added before the bad
  one still completes, and the engine keeps working.
- ENGINE_CASES: `LLM(...)` in-process; the message names the field, value or file.
- CLI_CASES: `ppruntime generate` as a subprocess: exit status 2 and a message naming
  the line or the flag, before anything is generated.
- MPI_CASES: `mpirun -n 2 ppruntime generate`: every rank exits non-zero quickly with
  a one-line message.
All subprocesses of a table are started together by one module fixture (fast), and
checked one test per case.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from launching import REPO_ROOT, describe, kill_job, mpi_command, mpi_env

from ppruntime import LLM, SamplingParams
from ppruntime.engine.errors import InvalidRequestError

MAX_MODEL_LEN = 128
TINY_VOCAB = 512  # the "tiny" preset
SUBPROCESS_TIMEOUT_S = 60
MPI_FAIL_FAST_S = 30
MPI_JOBS_AT_ONCE = 3


# =====================================================================================
# request level: LLM.add_request, in-process
# =====================================================================================
@dataclass(frozen=True)
class RequestCase:
    name: str
    prompt: Any = "hello"
    params: dict[str, Any] = field(default_factory=dict)
    expect: tuple[str, ...] = ()  # substrings of the error message


REQUEST_CASES = [
    RequestCase("empty-text-prompt", prompt="", expect=("prompt", "empty")),
    RequestCase("empty-token-prompt", prompt=[], expect=("prompt_token_ids", "empty")),
    RequestCase("token-id-negative", prompt=[5, -1, 7], expect=("prompt_token_ids[1]", "-1")),
    RequestCase(
        "token-id-at-vocab",
        prompt=[5, TINY_VOCAB],
        expect=("prompt_token_ids[1]", str(TINY_VOCAB), "vocab size"),
    ),
    RequestCase(
        "token-id-huge", prompt=np.array([2**40], np.int64), expect=("prompt_token_ids[0]",)
    ),
    RequestCase("token-id-float", prompt=[1, 2.5], expect=("prompt_token_ids", "int")),
    RequestCase("token-id-string", prompt=[1, "2"], expect=("prompt_token_ids", "int")),
    RequestCase("token-ids-nested", prompt=[[1, 2], [3, 4]], expect=("prompt_token_ids", "1-D")),
    RequestCase(
        "prompt-too-long",
        prompt=[5] * MAX_MODEL_LEN,
        expect=(str(MAX_MODEL_LEN), "max_model_len"),
    ),
    RequestCase("max-tokens-zero", params={"max_tokens": 0}, expect=("max_tokens", "0")),
    RequestCase("max-tokens-negative", params={"max_tokens": -3}, expect=("max_tokens", "-3")),
    RequestCase("max-tokens-float", params={"max_tokens": 2.0}, expect=("max_tokens", "2.0")),
    RequestCase(
        "max-tokens-beyond-model",
        params={"max_tokens": MAX_MODEL_LEN},
        expect=("max_tokens", str(MAX_MODEL_LEN), "max_model_len"),
    ),
    RequestCase(
        "temperature-negative", params={"temperature": -0.5}, expect=("temperature", "-0.5")
    ),
    RequestCase("temperature-nan", params={"temperature": math.nan}, expect=("temperature", "nan")),
    RequestCase("temperature-inf", params={"temperature": math.inf}, expect=("temperature", "inf")),
    RequestCase("top-p-zero", params={"top_p": 0.0}, expect=("top_p", "0.0")),
    RequestCase("top-p-above-one", params={"top_p": 1.5}, expect=("top_p", "1.5")),
    RequestCase("top-p-nan", params={"top_p": math.nan}, expect=("top_p", "nan")),
    RequestCase("top-k-below-minus-one", params={"top_k": -2}, expect=("top_k", "-2")),
    RequestCase("top-k-float", params={"top_k": 1.5}, expect=("top_k", "1.5")),
    RequestCase("top-k-string", params={"top_k": "5"}, expect=("top_k", "'5'")),
    RequestCase("min-p-negative", params={"min_p": -0.1}, expect=("min_p", "-0.1")),
    RequestCase("min-p-above-one", params={"min_p": 1.01}, expect=("min_p", "1.01")),
    RequestCase("logprobs-too-large", params={"logprobs": 10_000}, expect=("logprobs", "10000")),
    RequestCase("logprobs-negative", params={"logprobs": -1}, expect=("logprobs", "-1")),
    RequestCase("seed-float", params={"seed": 1.5}, expect=("seed", "1.5")),
    RequestCase("seed-string", params={"seed": "42"}, expect=("seed", "'42'")),
    RequestCase("seed-negative", params={"seed": -1}, expect=("seed", "-1", "2**63")),
    RequestCase("seed-2-to-63", params={"seed": 2**63}, expect=("seed", str(2**63))),
    RequestCase("seed-beyond-64-bits", params={"seed": -(2**70)}, expect=("seed", str(-(2**70)))),
    RequestCase("stop-lone-surrogate", params={"stop": ["a\udc80"]}, expect=("stop", "surrogate")),
    RequestCase("prompt-lone-surrogate", prompt="ab\ud800c", expect=("prompt", "surrogate", "2")),
    RequestCase("stop-not-strings", params={"stop": [1, 2]}, expect=("stop", "[1, 2]")),
    RequestCase("stop-not-a-sequence", params={"stop": 7}, expect=("stop", "7")),
    RequestCase("stop-empty-string", params={"stop": [""]}, expect=("stop", "['']")),
    RequestCase(
        "stop-token-id-out-of-vocab",
        params={"stop_token_ids": [TINY_VOCAB + 5]},
        expect=("stop_token_ids", str(TINY_VOCAB + 5)),
    ),
    RequestCase(
        "ignore-eos-not-bool", params={"ignore_eos": "yes"}, expect=("ignore_eos", "'yes'")
    ),
]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(preset="tiny", max_model_len=MAX_MODEL_LEN, watchdog_timeout_s=60)
    yield engine
    reports = engine.shutdown()
    assert reports is not None
    for report in reports:  # nothing a bad request did leaked a KV block
        assert report.kv_blocks_free == report.kv_blocks_total, report


def _run_until_finished(llm: LLM, request_id: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        finished, _ = llm.step()
        for output in finished:
            if output.request_id == request_id:
                return output
    raise AssertionError(f"{request_id} did not finish within {timeout_s} s")


@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda c: c.name)
def test_bad_request_is_rejected_and_running_requests_go_on(llm: LLM, case: RequestCase) -> None:
    good = llm.add_request(
        "a request already in flight", SamplingParams(max_tokens=6, temperature=0)
    )
    llm.step()  # it is running now
    params = {"max_tokens": 4, **case.params}
    with pytest.raises(InvalidRequestError) as error:
        llm.add_request(case.prompt, SamplingParams(**params))
    message = str(error.value)
    for expected in case.expect:
        assert expected in message, f"{case.name}: {expected!r} not in {message!r}"
    output = _run_until_finished(llm, good)
    assert output.finish_reason == "length" and len(output.token_ids) == 6, output
    # the engine still serves new requests after the rejection
    (after,) = llm.generate(["after"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(after.token_ids) == 3


@pytest.mark.parametrize(
    "field_name, value", [("top_p", 2.0), ("temperature", math.nan), ("top_k", -7)]
)
def test_params_changed_after_construction_are_checked(llm: LLM, field_name, value) -> None:
    """A field set after construction is validated at submission, not found by a stage."""
    with pytest.raises(InvalidRequestError, match=rf"prompt 1: .*{field_name}"):
        llm.generate(
            ["fine", "bad"],
            [SamplingParams(max_tokens=2), _unchecked_params(**{field_name: value})],
            use_tqdm=False,
        )
    assert not llm._executor.has_unfinished()  # nothing of the batch was submitted


def test_extreme_but_valid_values_are_accepted(llm: LLM) -> None:
    """Values at the edges must not crash a stage (a huge top_k once overflowed int32)."""
    params = [
        SamplingParams(max_tokens=3, top_k=2**40),
        SamplingParams(max_tokens=3, top_k=-1, top_p=1.0, min_p=1.0),
        SamplingParams(max_tokens=3, seed=2**63 - 1),
        SamplingParams(max_tokens=3, seed=0),
        SamplingParams(max_tokens=3, logprobs=20),
        SamplingParams(max_tokens=MAX_MODEL_LEN - 2),  # prompt "x" is BOS + 1 token
    ]
    outputs = llm.generate(["x"] * len(params), params, use_tqdm=False)
    assert [len(o.token_ids) > 0 for o in outputs] == [True] * len(params)


def _unchecked_params(**fields: Any) -> SamplingParams:
    """A SamplingParams whose fields were changed after validation (what a user can do)."""
    params = SamplingParams(max_tokens=2)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


# =====================================================================================
# engine level: LLM(...), in-process
# =====================================================================================
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A valid tiny Llama checkpoint and broken copies of it."""
    from model_fixtures import make_tiny_checkpoint
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("checkpoints")
    good = make_tiny_checkpoint(root / "good", "llama", num_hidden_layers=2)
    (weights,) = good.glob("*.safetensors")

    def variant(name: str) -> Path:
        directory = root / name
        shutil.copytree(good, directory)
        return directory

    made = {"good": good}
    made["no-config"] = variant("no-config")
    (made["no-config"] / "config.json").unlink()
    made["bad-json"] = variant("bad-json")
    (made["bad-json"] / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    made["config-not-object"] = variant("config-not-object")
    (made["config-not-object"] / "config.json").write_text("[1, 2]")
    made["config-missing-field"] = variant("config-missing-field")
    config = json.loads((good / "config.json").read_text())
    del config["hidden_size"]
    (made["config-missing-field"] / "config.json").write_text(json.dumps(config))
    made["unsupported-arch"] = variant("unsupported-arch")
    config = json.loads((good / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (made["unsupported-arch"] / "config.json").write_text(json.dumps(config))
    made["corrupt-safetensors"] = variant("corrupt-safetensors")
    (made["corrupt-safetensors"] / weights.name).write_bytes(b"\x08\x00\x00\x00garbage!" * 4)
    made["truncated-safetensors"] = variant("truncated-safetensors")
    data = weights.read_bytes()
    (made["truncated-safetensors"] / weights.name).write_bytes(data[: len(data) // 2])
    made["missing-tensor"] = variant("missing-tensor")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, made["missing-tensor"] / weights.name, metadata={"format": "pt"})
    made["no-safetensors"] = variant("no-safetensors")
    (made["no-safetensors"] / weights.name).unlink()
    return made


@dataclass(frozen=True)
class EngineCase:
    name: str
    kwargs: dict[str, Any]
    expect: tuple[str, ...]
    checkpoint: str | None = None  # key of `checkpoints`, passed as model=


ENGINE_CASES = [
    EngineCase("unknown-preset", {"preset": "no-such-preset"}, ("no-such-preset", "preset")),
    EngineCase("model-directory-missing", {"model": "/nonexistent/ckpt"}, ("/nonexistent/ckpt",)),
    EngineCase("config-json-missing", {}, ("config.json", "not found"), "no-config"),
    EngineCase("config-json-invalid", {}, ("config.json", "not valid JSON"), "bad-json"),
    EngineCase("config-json-not-object", {}, ("config.json", "JSON object"), "config-not-object"),
    EngineCase("config-field-missing", {}, ("config.json", "hidden_size"), "config-missing-field"),
    EngineCase(
        "unsupported-architecture", {}, ("GPT2LMHeadModel", "not supported"), "unsupported-arch"
    ),
    EngineCase("corrupt-safetensors", {}, ("model.safetensors", "corrupt"), "corrupt-safetensors"),
    EngineCase("truncated-safetensors", {}, ("model.safetensors",), "truncated-safetensors"),
    EngineCase("missing-tensor", {}, ("model.layers.1.mlp.down_proj.weight",), "missing-tensor"),
    EngineCase("no-safetensors-file", {}, ("safetensors",), "no-safetensors"),
    EngineCase("unsupported-dtype", {"dtype": "int8"}, ("int8", "not supported"), "good"),
    EngineCase("unsupported-dtype-preset", {"preset": "tiny", "dtype": "float64"}, ("float64",)),
    EngineCase("pp-size-not-world-size", {"preset": "tiny", "pp_size": 2}, ("pp_size=2", "1 rank")),
    EngineCase("pp-size-zero", {"preset": "tiny", "pp_size": 0}, ("pp_size", "0")),
    EngineCase(
        "layer-partition-not-integers", {"preset": "tiny", "layer_partition": "3,x"}, ("3,x", "'x'")
    ),
    EngineCase(
        "layer-partition-wrong-sum", {"preset": "tiny", "layer_partition": "3"}, ("3", "4 layers")
    ),
    EngineCase(
        "layer-partition-wrong-stages",
        {"preset": "tiny", "layer_partition": "2,2"},
        ("2,2", "2 stages", "pp_size"),
    ),
    EngineCase("layer-partition-zero", {"preset": "tiny", "layer_partition": "0"}, ("'0'", ">= 1")),
    EngineCase(
        "kv-cache-too-small",
        {"preset": "tiny", "kv_cache_blocks": 4, "max_model_len": 256},
        ("4 blocks", "max_model_len=256", "16 blocks"),
    ),
    EngineCase(
        "kv-cache-blocks-zero", {"preset": "tiny", "kv_cache_blocks": 0}, ("kv_cache_blocks", "0")
    ),
    EngineCase(
        "max-model-len-beyond-model",
        {"preset": "tiny", "max_model_len": 10**6},
        ("max_model_len=1000000", "max_position_embeddings"),
    ),
    EngineCase(
        "max-batch-size-zero", {"preset": "tiny", "max_batch_size": 0}, ("max_batch_size", "0")
    ),
    EngineCase(
        "watchdog-timeout-negative",
        {"preset": "tiny", "watchdog_timeout_s": -1.0},
        ("watchdog_timeout_s", "-1"),
    ),
    EngineCase(  # once silently the default of 300 s
        "watchdog-timeout-zero",
        {"preset": "tiny", "watchdog_timeout_s": 0},
        ("watchdog_timeout_s", "--watchdog-timeout", "got 0", "does not turn it off"),
    ),
    EngineCase(
        "startup-timeout-zero",
        {"preset": "tiny", "startup_timeout_s": 0},
        ("startup_timeout_s", "--startup-timeout", "got 0"),
    ),
    EngineCase(
        "startup-timeout-nan",
        {"preset": "tiny", "startup_timeout_s": float("nan")},
        ("startup_timeout_s", "nan"),
    ),
]


@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda c: c.name)
def test_bad_engine_setting_is_named(case: EngineCase, checkpoints: dict[str, Path]) -> None:
    kwargs = dict(case.kwargs)
    if case.checkpoint is not None:
        kwargs["model"] = str(checkpoints[case.checkpoint])
    with pytest.raises((ValueError, RuntimeError)) as error:
        LLM(**kwargs)
    message = str(error.value)
    for expected in case.expect:
        assert expected in message, f"{case.name}: {expected!r} not in {message!r}"
    assert "Traceback" not in message


def test_good_checkpoint_loads(checkpoints: dict[str, Path]) -> None:
    """The broken variants are broken only where the case says."""
    with LLM(model=str(checkpoints["good"]), max_model_len=64) as engine:
        (output,) = engine.generate([[1, 5, 9]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(output.token_ids) == 3


# =====================================================================================
# CLI level: `ppruntime generate` as a subprocess
# =====================================================================================
@dataclass(frozen=True)
class CliCase:
    name: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    prompts: str | None = None  # contents of a prompts file, passed as --prompts-file


CLI_CASES = [
    CliCase(
        "prompts-file-bad-json",
        (),
        ("prompts.jsonl:2", "not valid JSON"),
        '{"prompt": "fine"}\n{"prompt": "oops"\n',
    ),
    CliCase("prompts-file-not-object", (), ("prompts.jsonl:1", "JSON object"), '["a"]\n'),
    CliCase(
        "prompts-file-no-field",
        (),
        ("prompts.jsonl:3", "'prompt'"),
        '{"prompt": "a"}\n\n{"text": "b"}\n',
    ),
    CliCase("prompts-file-empty-prompt", (), ("prompts.jsonl:1", "'prompt'"), '{"prompt": ""}\n'),
    CliCase(
        "prompts-file-token-not-int",
        (),
        ("prompts.jsonl:1", "prompt_token_ids"),
        '{"prompt_token_ids": [1, "two"]}\n',
    ),
    CliCase(
        "prompts-file-token-out-of-vocab",
        (),
        ("prompts.jsonl:2", "prompt_token_ids[1]", "9999"),
        '{"prompt": "ok"}\n{"prompt_token_ids": [1, 9999]}\n',
    ),
    CliCase(
        "prompts-file-missing",
        ("--prompts-file", "/nonexistent/p.jsonl"),
        ("/nonexistent/p.jsonl",),
    ),
    CliCase(
        "temperature-negative", ("--prompt", "x", "--temperature", "-1"), ("temperature", "-1")
    ),
    CliCase("top-p-above-one", ("--prompt", "x", "--top-p", "1.5"), ("top_p", "1.5")),
    CliCase("max-tokens-zero", ("--prompt", "x", "--max-tokens", "0"), ("max_tokens", "0")),
    CliCase(
        "watchdog-timeout-zero",
        ("--prompt", "x", "--watchdog-timeout", "0"),
        ("--watchdog-timeout", "got 0.0"),
    ),
    CliCase(
        "startup-timeout-negative",
        ("--prompt", "x", "--startup-timeout", "-5"),
        ("--startup-timeout", "got -5.0"),
    ),
    CliCase(
        "max-tokens-beyond-model",
        ("--prompt", "x", "--max-tokens", "5000"),
        ("--prompt #1", "max_tokens", "5000"),
    ),
    CliCase(
        "stop-token-ids-not-ints",
        ("--prompt", "x", "--stop-token-ids", "1,b"),
        ("--stop-token-ids", "1,b"),
    ),
    CliCase("logprobs-too-large", ("--prompt", "x", "--logprobs", "500"), ("logprobs", "500")),
    CliCase("layer-partition-bad", ("--prompt", "x", "--layer-partition", "2;2"), ("2;2",)),
    CliCase("unknown-preset", ("--prompt", "x", "--preset", "huge"), ("huge", "preset")),
    CliCase("unsupported-dtype", ("--prompt", "x", "--dtype", "int4"), ("int4",)),
    CliCase(
        "kv-cache-too-small",
        ("--prompt", "x", "--kv-cache-blocks", "3"),
        ("3 blocks", "--kv-cache-blocks"),
    ),
    CliCase("no-prompts", (), ("no prompts",)),
]


def _cli_command(case: CliCase, workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "ppruntime", "generate", "--quiet", *case.args]
    if case.prompts is not None:
        case_dir = workdir / case.name
        case_dir.mkdir()
        (case_dir / "prompts.jsonl").write_text(case.prompts)
        args += ["--prompts-file", str(case_dir / "prompts.jsonl")]
    return args


def _run_together(commands: dict[str, list[str]], timeout_s: float) -> dict[str, Any]:
    """Start every command at once (own session each); wait for all; kill on timeout."""
    procs = {
        name: subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=mpi_env({"PPRUNTIME_TORCH_THREADS": "1"}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        for name, command in commands.items()
    }
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        for name, proc in procs.items():
            remaining = max(1.0, timeout_s - (time.monotonic() - started))
            try:
                stdout, stderr = proc.communicate(timeout=remaining)
            except subprocess.TimeoutExpired:
                stdout, stderr = kill_job(proc)
                raise AssertionError(
                    f"{name} did not end within {timeout_s} s:\n{stdout}\n{stderr}"
                ) from None
            elapsed = time.monotonic() - started
            results[name] = (
                subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                elapsed,
            )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_job(proc)
    return results


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("cli")
    commands = {case.name: _cli_command(case, workdir) for case in CLI_CASES}
    return _run_together(commands, SUBPROCESS_TIMEOUT_S)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.name)
def test_cli_bad_input_exits_2(case: CliCase, cli_results: dict[str, Any]) -> None:
    result, _ = cli_results[case.name]
    assert result.returncode == 2, describe(result)
    assert result.stdout == "", f"nothing may be generated on bad input\n{describe(result)}"
    message = result.stderr
    assert "ppruntime generate: error:" in message, describe(result)
    for expected in case.expect:
        assert expected in message, f"{case.name}: {expected!r} not in stderr\n{describe(result)}"
    assert "Traceback" not in message, describe(result)


# =====================================================================================
# MPI level: `mpirun -n 2 ppruntime generate` with a configuration no rank can run
# =====================================================================================
@dataclass(frozen=True)
class MpiCase:
    name: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    one_layer_model: bool = False


MPI_CASES = [
    MpiCase("pp-size-not-world-size", ("--pp-size", "3"), ("pp_size=3", "2 rank(s)")),
    MpiCase(
        "layer-partition-wrong-stages",
        ("--layer-partition", "1,1,2"),
        ("1,1,2", "3 stages", "pp_size is 2"),
    ),
    MpiCase("more-stages-than-layers", (), ("pp_size=2", "only 1 layers"), one_layer_model=True),
    MpiCase("missing-model-dir", ("--model", "{missing}"), ("{missing}",)),
    MpiCase("corrupt-safetensors", ("--model", "{corrupt}"), ("model.safetensors",)),
]


@pytest.fixture(scope="module")
def mpi_results(tmp_path_factory, checkpoints: dict[str, Path]) -> dict[str, Any]:
    from model_fixtures import make_tiny_checkpoint

    one_layer = make_tiny_checkpoint(tmp_path_factory.mktemp("one-layer"), num_hidden_layers=1)
    paths = {
        "missing": str(tmp_path_factory.mktemp("absent") / "no-such-model"),
        "corrupt": str(checkpoints["corrupt-safetensors"]),
    }
    commands = {}
    for case in MPI_CASES:
        model = ("--model", str(one_layer)) if case.one_layer_model else ()
        case_args = [arg.format(**paths) for arg in case.args]
        args = [sys.executable, "-m", "ppruntime", "generate", "--prompt", "x", *model, *case_args]
        commands[case.name] = mpi_command(2, args)
    # a few jobs at a time: the fail-fast bound is for a job sharing two cores with a
    # couple of others, not with every case of this list
    results: dict[str, Any] = {"paths": paths}
    names = list(commands)
    for start in range(0, len(names), MPI_JOBS_AT_ONCE):
        batch = {name: commands[name] for name in names[start : start + MPI_JOBS_AT_ONCE]}
        results.update(_run_together(batch, SUBPROCESS_TIMEOUT_S))
    return results


@pytest.mark.parametrize("case", MPI_CASES, ids=lambda c: c.name)
def test_mpi_misconfiguration_fails_fast_everywhere(
    case: MpiCase, mpi_results: dict[str, Any]
) -> None:
    result, elapsed = mpi_results[case.name]
    assert result.returncode == 2, describe(result)
    assert elapsed < MPI_FAIL_FAST_S, f"took {elapsed:.1f} s\n{describe(result)}"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"expected one error line\n{describe(result)}"
    for expected in case.expect:
        expected = expected.format(**mpi_results["paths"])
        assert expected in errors[0], f"{case.name}: {expected!r} not in {errors[0]!r}"
    assert "Traceback" not in result.stderr, describe(result)
    assert "MPI_ABORT" not in result.stderr, describe(result)  # every rank ended by itself
