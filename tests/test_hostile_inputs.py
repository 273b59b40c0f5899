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
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from launching import REPO_ROOT, describe, kill_job, mpi_command, mpi_env, run_mpi

from ppruntime import LLM, SamplingParams
from ppruntime.engine.errors import InvalidRequestError

MAX_MODEL_LEN = 128
TINY_VOCAB = 512  # the "tiny" preset
SUBPROCESS_TIMEOUT_S = 150  # every job of a table at once, on two busy cores
MPI_FAIL_FAST_S = 60
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


@pytest.mark.parametrize("request_id", [[1], "", 5, None.__class__])
def test_bad_request_id_is_rejected(llm: LLM, request_id) -> None:
    with pytest.raises(InvalidRequestError, match="request_id must be a non-empty str"):
        llm.add_request("hello", SamplingParams(max_tokens=2), request_id=request_id)
    assert not llm._executor.has_unfinished()


def test_abort_twice_is_false_the_second_time(llm: LLM) -> None:
    request_id = llm.add_request("abort me", SamplingParams(max_tokens=40, temperature=0))
    llm.step()
    assert llm.abort(request_id) is True
    assert llm.abort(request_id) is False  # already being aborted
    output = _run_until_finished(llm, request_id)
    assert output.finish_reason == "abort"
    assert llm.abort(request_id) is False  # finished
    assert llm.abort("no-such-request") is False


# =====================================================================================
# numerics: temperatures float32 cannot divide by are greedy
# =====================================================================================
@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_tiny_temperature_is_greedy(llm: LLM, temperature: float) -> None:
    """1e-40 once returned token 0 at every step (the logits / 1e-40 overflowed to inf)."""
    greedy = SamplingParams(max_tokens=8, temperature=0, logprobs=2, ignore_eos=True)
    tiny = SamplingParams(max_tokens=8, temperature=temperature, logprobs=2, ignore_eos=True)
    seeded = SamplingParams(
        max_tokens=8, temperature=temperature, seed=7, logprobs=2, ignore_eos=True
    )
    prompts = ["hello", "once upon a time"]
    expected = llm.generate(prompts, greedy, use_tqdm=False)
    for params in (tiny, seeded):
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for output, reference in zip(outputs, expected):
            assert output.token_ids == reference.token_ids, (temperature, params)
            for step, token in zip(output.logprobs, output.token_ids):
                assert step[token] == max(step.values())  # the most likely token


# =====================================================================================
# every output reaches exactly one consumer
# =====================================================================================
def _drain_step(llm: LLM, wanted: set[str], timeout_s: float = 30.0):
    """step() until every request of `wanted` finished: (final outputs, deltas) by id."""
    finals: dict[str, Any] = {}
    deltas: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while not wanted <= finals.keys():
        assert time.monotonic() < deadline, f"{wanted - finals.keys()} did not finish"
        finished, events = llm.step()
        for output in finished:
            assert output.request_id not in finals, f"{output.request_id} finished twice"
            finals[output.request_id] = output
        for delta in events:
            deltas.setdefault(delta.request_id, []).append(delta)
    return finals, deltas


def _add_others(llm: LLM) -> tuple[str, str]:
    plain = llm.add_request("A plain request", SamplingParams(max_tokens=6, temperature=0))
    streamed = llm.add_request(
        "A streamed one", SamplingParams(max_tokens=9, temperature=0), stream=True
    )
    llm.step()
    return plain, streamed


def _check_others(llm: LLM, plain: str, streamed: str) -> None:
    finals, deltas = _drain_step(llm, {plain, streamed})
    assert set(finals) == {plain, streamed}
    assert len(finals[plain].token_ids) == 6 and plain not in deltas
    stream = deltas[streamed]
    assert [t for d in stream for t in d.token_ids] == finals[streamed].token_ids
    assert len(finals[streamed].token_ids) == 9
    assert "".join(d.text for d in stream) == finals[streamed].text
    assert stream[-1].finished and stream[-1].finish_reason == "length"


def test_generate_leaves_other_requests_outputs_for_step(llm: LLM) -> None:
    plain, streamed = _add_others(llm)
    outputs = llm.generate(["x", "y"], SamplingParams(max_tokens=12), use_tqdm=False)
    assert [len(o.token_ids) for o in outputs] == [12, 12]
    assert {o.request_id for o in outputs}.isdisjoint({plain, streamed})
    _check_others(llm, plain, streamed)


def test_generate_stream_leaves_other_requests_outputs_for_step(llm: LLM) -> None:
    plain, streamed = _add_others(llm)
    deltas = list(llm.generate_stream(["x", "y"], SamplingParams(max_tokens=12)))
    assert {d.request_id for d in deltas}.isdisjoint({plain, streamed})
    assert sum(len(d.token_ids) for d in deltas) == 24
    assert sum(d.finished for d in deltas) == 2
    _check_others(llm, plain, streamed)


def test_stream_closed_early_hands_its_requests_to_step(llm: LLM) -> None:
    stream = llm.generate_stream(["x", "y"], SamplingParams(max_tokens=10, temperature=0))
    first = next(stream)
    stream.close()
    finals, deltas = {}, {}
    deadline = time.monotonic() + 30
    while llm._executor.has_unfinished():  # both of its requests go on, their outputs to step()
        assert time.monotonic() < deadline
        finished, events = llm.step()
        finals.update((output.request_id, output) for output in finished)
        for delta in events:
            deltas.setdefault(delta.request_id, []).append(delta)
    assert len(finals) == 2 and first.request_id in finals
    mine = finals[first.request_id]
    rest = [t for d in deltas.get(first.request_id, []) for t in d.token_ids]
    assert first.token_ids + rest == mine.token_ids  # no delta lost, none twice
    assert all(len(output.token_ids) == 10 for output in finals.values())


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
    made["layers-not-integer"] = variant("layers-not-integer")
    config = json.loads((good / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (made["layers-not-integer"] / "config.json").write_text(json.dumps(config))
    made["int32-tensor"] = variant("int32-tensor")
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, made["int32-tensor"] / weights.name, metadata={"format": "pt"})
    return made


@dataclass(frozen=True)
class EngineCase:
    name: str
    kwargs: dict[str, Any]
    expect: tuple[str, ...]
    checkpoint: str | None = None  # key of `checkpoints`, passed as model=
    env: dict[str, str] = field(default_factory=dict)


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
    EngineCase(
        "config-field-not-integer",
        {},
        ("config.json", "'num_hidden_layers'", "'two'"),
        "layers-not-integer",
    ),
    EngineCase(
        "int32-weight-tensor",
        {},
        ("model.layers.0.self_attn.o_proj.weight", "I32", "floating point"),
        "int32-tensor",
    ),
    EngineCase(
        "kv-cache-blocks-beyond-int32",
        {"preset": "tiny", "kv_cache_blocks": 10**12},
        ("kv_cache_blocks=1000000000000", "int32"),
    ),
    EngineCase(
        "kv-cache-beyond-memory",
        {"preset": "tiny", "kv_cache_blocks": 2**31 - 1},
        ("2147483647 blocks", "GiB", "--kv-cache-blocks"),
    ),
    EngineCase("device-unknown", {"preset": "tiny", "device": "tpu"}, ("device", "'tpu'")),
    EngineCase("engine-seed-negative", {"preset": "tiny", "seed": -1}, ("seed", "-1", "2**63")),
    EngineCase("engine-seed-2-to-63", {"preset": "tiny", "seed": 2**63}, ("seed", str(2**63))),
    EngineCase(
        "trace-directory-missing",
        {"preset": "tiny", "trace": "/nonexistent/t.json"},
        ("trace", "/nonexistent/t.json"),
    ),
    EngineCase(
        "log-dir-is-a-file",
        {"preset": "tiny", "log_dir": str(REPO_ROOT / "README.md")},
        ("--log-dir", "README.md", "not a directory"),
    ),
    EngineCase("log-level-unknown", {"preset": "tiny", "log_level": "LOUD"}, ("'LOUD'", "level")),
    EngineCase(
        "deterministic-env-not-boolean",
        {"preset": "tiny"},
        ("PPRUNTIME_DETERMINISTIC", "'maybe'"),
        env={"PPRUNTIME_DETERMINISTIC": "maybe"},
    ),
    EngineCase(
        "torch-threads-not-integer",
        {"preset": "tiny"},
        ("PPRUNTIME_TORCH_THREADS", "'abc'"),
        env={"PPRUNTIME_TORCH_THREADS": "abc"},
    ),
    EngineCase(
        "torch-threads-negative",
        {"preset": "tiny"},
        ("PPRUNTIME_TORCH_THREADS", "'-1'"),
        env={"PPRUNTIME_TORCH_THREADS": "-1"},
    ),
    EngineCase(
        "omp-threads-not-integer",
        {"preset": "tiny"},
        ("OMP_NUM_THREADS", "'x'"),
        env={"PPRUNTIME_TORCH_THREADS": "", "OMP_NUM_THREADS": "x"},
    ),
    EngineCase(
        "device-env-unknown",
        {"preset": "tiny"},
        ("PPRUNTIME_DEVICE", "'tpu'"),
        env={"PPRUNTIME_DEVICE": "tpu"},
    ),
]


@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda c: c.name)
def test_bad_engine_setting_is_named(
    case: EngineCase, checkpoints: dict[str, Path], monkeypatch
) -> None:
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
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
# numerics: logits that hold a NaN or an inf end that request, and only that one
# =====================================================================================
NAN_OTHERS = [[1, 5, 9, 10, 11], [1, 6, 8]]
NAN_MID = [1, 20, 30, 40]
NAN_MAX_TOKENS = 8


def _nan_params() -> list[SamplingParams]:
    """For NAN_OTHERS[0], the prompt holding the poisoned token, NAN_MID, NAN_OTHERS[1]."""
    greedy = SamplingParams(max_tokens=NAN_MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(max_tokens=NAN_MAX_TOKENS, temperature=0.8, seed=3, ignore_eos=True)
    return [greedy, greedy, greedy, sampled]


def _nan_engine(model: Path, **kwargs) -> LLM:
    # small blocks and cache: the failed requests' blocks are reused by the next ones
    return LLM(model=str(model), max_model_len=32, block_size=4, kv_cache_blocks=24, **kwargs)


@pytest.fixture(scope="module")
def poisoned(checkpoints: dict[str, Path], tmp_path_factory) -> dict[str, Any]:
    """The good checkpoint with the embedding row of one token set to NaN, the token
    chosen among NAN_MID's greedy continuation (so that request fails midway) and
    absent from the other requests; and the good model's outputs, for comparison."""
    from safetensors.torch import load_file, save_file

    params = _nan_params()
    with _nan_engine(checkpoints["good"]) as engine:
        (mid,) = engine.generate([NAN_MID], params[2], use_tqdm=False)
        others = engine.generate(NAN_OTHERS, [params[0], params[3]], use_tqdm=False)
    forbidden = set(NAN_MID) | {t for p in NAN_OTHERS for t in p}
    forbidden |= {t for output in others for t in output.token_ids}
    position = next(
        k
        for k in range(2, NAN_MAX_TOKENS - 1)
        if mid.token_ids[k] not in forbidden | set(mid.token_ids[:k])
    )
    token = mid.token_ids[position]
    directory = tmp_path_factory.mktemp("poisoned") / "llama"
    shutil.copytree(checkpoints["good"], directory)
    (weights,) = directory.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"][token] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return {"model": directory, "token": token, "position": position, "mid": mid, "others": others}


def test_nonfinite_logits_end_that_request_and_the_others_go_on(poisoned) -> None:
    token, position = poisoned["token"], poisoned["position"]
    prompts = [NAN_OTHERS[0], [1, token, 9], NAN_MID, NAN_OTHERS[1]]
    with _nan_engine(poisoned["model"]) as engine:
        outputs = engine.generate(prompts, _nan_params(), use_tqdm=False)
        other, at_once, midway, sampled = outputs
        assert at_once.finish_reason == "error" and at_once.token_ids == [], at_once
        assert "NaN or inf" in at_once.error and "generated token 1" in at_once.error
        # NAN_MID generates the poisoned token, lands it, then fails on the next step
        assert midway.finish_reason == "error", midway
        assert midway.token_ids == poisoned["mid"].token_ids[: position + 1]
        assert f"generated token {position + 2}" in midway.error
        assert len(midway.logprobs) == position + 1
        assert all(math.isfinite(v) for step in midway.logprobs for v in step.values())
        # the others in the same batch are what the healthy model gives
        expected = poisoned["others"]
        assert other.token_ids == expected[0].token_ids and other.error is None
        assert sampled.token_ids == expected[1].token_ids and sampled.finish_reason == "length"
        # the failed requests' KV blocks (NaN inside) are reused without harm
        again = engine.generate(NAN_OTHERS, [_nan_params()[0], _nan_params()[3]], use_tqdm=False)
        assert [o.token_ids for o in again] == [o.token_ids for o in expected]
        # streaming: the last delta carries the reason and the message
        deltas = list(engine.generate_stream([[1, token, 9]], _nan_params()[1]))
        assert deltas[-1].finished and deltas[-1].finish_reason == "error"
        assert "NaN or inf" in deltas[-1].error
        assert outputs[1].to_json()["error"] == at_once.error  # --json carries it
        reports = engine.shutdown()
    assert all(r.kv_blocks_free == r.kv_blocks_total for r in reports)


def test_nonfinite_logits_with_async_scheduling(poisoned) -> None:
    """The poisoned token reaches the next step on the device (continued before it
    landed); that step ends the request, and the step after it, already computed,
    adds nothing: the same outputs as the synchronous loop."""
    token = poisoned["token"]
    prompts = [NAN_OTHERS[0], [1, token, 9], NAN_MID, NAN_OTHERS[1]]
    results = {}
    for flag in (False, True):
        with _nan_engine(poisoned["model"], async_scheduling=flag) as engine:
            outputs = engine.generate(prompts, _nan_params(), use_tqdm=False)
            continued = engine._executor.stats.rows_continued
            reports = engine.shutdown()
        assert all(r.kv_blocks_free == r.kv_blocks_total for r in reports)
        assert (continued > 0) == flag
        results[flag] = [(o.token_ids, o.finish_reason, o.error) for o in outputs]
    assert results[True] == results[False]
    assert [reason for _, reason, _ in results[True]] == ["length", "error", "error", "length"]


def test_nonfinite_logits_under_mpirun_cli(poisoned, tmp_path: Path) -> None:
    """PP=2: every rank releases the failed requests in the same iteration; the CLI
    names them on stderr, exits 1, and --json / --output carry the error."""
    prompts = [NAN_OTHERS[0], [1, poisoned["token"], 9], NAN_MID]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    output = tmp_path / "results.jsonl"
    args = [sys.executable, "-m", "ppruntime", "generate", "--model", str(poisoned["model"])]
    args += ["--prompts-file", str(prompts_file), "--max-tokens", str(NAN_MAX_TOKENS)]
    args += ["--ignore-eos", "--json", "--quiet", "--output", str(output), "--block-size", "4"]
    args += ["--kv-cache-blocks", "24", "--max-model-len", "32"]
    result = run_mpi(2, args, SUBPROCESS_TIMEOUT_S, env={"PPRUNTIME_TORCH_THREADS": "1"})
    assert result.returncode == 1, describe(result)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["finish_reason"] for r in records] == ["length", "error", "error"], records
    assert records[0]["token_ids"] == poisoned["others"][0].token_ids and "error" not in records[0]
    assert records[1]["token_ids"] == []
    assert records[2]["token_ids"] == poisoned["mid"].token_ids[: poisoned["position"] + 1]
    for line in (2, 3):
        assert f"error: {prompts_file}:{line}: the model produced non-finite" in result.stderr
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert results == [{"index": i, **record} for i, record in enumerate(records)]


# =====================================================================================
# CLI level: `ppruntime generate` as a subprocess
# =====================================================================================
@dataclass(frozen=True)
class CliCase:
    name: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    prompts: str | bytes | None = None  # contents of a prompts file, passed as --prompts-file
    env: dict[str, str] = field(default_factory=dict)


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
        ("prompts.jsonl:3", "'prompt'", "'prompt_token_ids'"),
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
        "prompts-file-token-float",
        (),
        ("prompts.jsonl:2", "prompt_token_ids"),
        '{"prompt": "a"}\n{"prompt_token_ids": [1, 2.5]}\n',
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
        ("--prompts-file", "/nonexistent/p.jsonl"),
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
        "max-tokens-beyond-max-model-len-flag",
        ("--prompt", "x", "--max-model-len", "32", "--max-tokens", "40"),
        ("--prompt #1", "max_tokens", "40"),
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
    CliCase(
        "prompts-file-latin-1",
        (),
        ("prompts.jsonl:2", "not UTF-8", "0xe9"),
        b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n',
    ),
    CliCase(
        "prompts-file-binary",
        (),
        ("prompts.jsonl:1", "not UTF-8", "0x89"),
        b"\x89PNG\r\n\x1a\n\0\0",
    ),
    CliCase(
        "prompts-file-unknown-key",
        (),
        ("prompts.jsonl:2", "unknown field", "'max_tokens'"),
        '{"prompt": "a"}\n{"prompt": "b", "max_tokens": 3}\n',
    ),
    CliCase(
        "prompts-file-lone-surrogate",
        (),
        ("prompts.jsonl:1", "surrogate"),
        '{"prompt": "a\\ud800"}\n',
    ),
    CliCase(
        "kv-cache-blocks-beyond-int32",
        ("--prompt", "x", "--kv-cache-blocks", "1000000000000"),
        ("kv_cache_blocks=1000000000000", "--kv-cache-blocks"),
    ),
    CliCase("log-dir-is-a-file", ("--prompt", "x", "--log-dir", "README.md"), ("--log-dir",)),
    CliCase("device-unknown", ("--prompt", "x", "--device", "tpu"), ("device", "'tpu'")),
    CliCase(
        "torch-threads-not-integer",
        ("--prompt", "x"),
        ("PPRUNTIME_TORCH_THREADS", "'abc'"),
        env={"PPRUNTIME_TORCH_THREADS": "abc"},
    ),
    CliCase(
        "deterministic-env-not-boolean",
        ("--prompt", "x"),
        ("PPRUNTIME_DETERMINISTIC", "'maybe'"),
        env={"PPRUNTIME_DETERMINISTIC": "maybe"},
    ),
    CliCase(
        "trace-directory-missing",
        ("--prompt", "x", "--trace", "/nonexistent/t.json"),
        ("--trace", "/nonexistent/t.json"),
    ),
    CliCase(
        "output-directory-missing",
        ("--prompt", "x", "--output", "/nonexistent/o.jsonl"),
        ("--output", "/nonexistent/o.jsonl"),
    ),
    CliCase("output-is-a-directory", ("--prompt", "x", "--output", "tests"), ("--output", "tests")),
]


def _cli_command(case: CliCase, workdir: Path) -> list[str]:
    args = [sys.executable, "-m", "ppruntime", "generate", "--quiet", *case.args]
    if case.prompts is not None:
        case_dir = workdir / case.name
        case_dir.mkdir()
        prompts_file = case_dir / "prompts.jsonl"
        if isinstance(case.prompts, bytes):
            prompts_file.write_bytes(case.prompts)
        else:
            prompts_file.write_text(case.prompts)
        args += ["--prompts-file", str(case_dir / "prompts.jsonl")]
    return args


def _run_together(
    commands: dict[str, list[str]],
    timeout_s: float,
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Start every command at once (own session each); wait for all; kill on timeout."""
    envs = envs or {}
    procs = {
        name: subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=mpi_env({"PPRUNTIME_TORCH_THREADS": "1", **envs.get(name, {})}),
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
    envs = {case.name: case.env for case in CLI_CASES}
    return _run_together(commands, SUBPROCESS_TIMEOUT_S, envs)


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
    checkpoint: str | None = None  # key of `checkpoints`, passed as --model
    rank_1_env: dict[str, str] = field(default_factory=dict)  # set on rank 1 only


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
    MpiCase(
        "bad-setting-on-rank-1-only",
        (),
        ("rank 1", "PPRUNTIME_TORCH_THREADS", "'abc'"),
        rank_1_env={"PPRUNTIME_TORCH_THREADS": "abc"},
    ),
    MpiCase(
        "kv-cache-beyond-memory",
        ("--kv-cache-blocks", "2147483647"),
        ("2147483647 blocks", "GiB", "--kv-cache-blocks"),
    ),
    MpiCase(
        "config-field-not-integer",
        (),
        ("config.json", "'num_hidden_layers'", "'two'"),
        checkpoint="layers-not-integer",
    ),
]


def _on_rank_1(env: dict[str, str], args: list[str]) -> list[str]:
    """`args` run with `env` added on rank 1 only (Open MPI's or MPICH's rank variable)."""
    exports = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    script = (
        'if [ "${OMPI_COMM_WORLD_RANK:-$PMI_RANK}" = 1 ]; then export '
        + exports
        + '; fi; exec "$@"'
    )
    return ["sh", "-c", script, "sh", *args]


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
        model: tuple[str, ...] = ()
        if case.one_layer_model:
            model = ("--model", str(one_layer))
        elif case.checkpoint is not None:
            model = ("--model", str(checkpoints[case.checkpoint]))
        case_args = [arg.format(**paths) for arg in case.args]
        args = [sys.executable, "-m", "ppruntime", "generate", "--prompt", "x", *model, *case_args]
        if case.rank_1_env:
            args = _on_rank_1(case.rank_1_env, args)
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
