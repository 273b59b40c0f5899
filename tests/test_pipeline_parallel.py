"""Pipeline parallelism end to end: PP = 1, 2, 3, 4 under mpirun, against transformers.

Every MPI job runs tests/mpi_scenarios.py, which builds several engines one after the
other inside the job (`LLM(..., exit_workers=False)`), so mpirun and import costs are
paid once per job, not once per case. Jobs run lazily (the first test that needs one
starts it) and at most once per module; a job that failed fails every test that
needs it, with its output.

Jobs (uneven layer partitions of the 5-layer tiny checkpoints):
  pp1       1 rank                 greedy, features, sliced, long, shutdown
  pp2       2 ranks  "4,1"         greedy, features, sliced ("2,1"), long, shutdown, abort,
                                   cadence
  pp3       3 ranks  "1,3,1"       greedy, features, sliced ("1,1,1"), shutdown, abort, cadence
  pp4       4 ranks  "2,1,1,1"     greedy, shutdown
  pp2-slow  2 ranks  "4,1"  PPRUNTIME_STAGE_DELAY_MS=1:20   greedy, shutdown
  pp3-slow  3 ranks  "1,3,1" PPRUNTIME_STAGE_DELAY_MS=1:20  greedy (llama), shutdown
each in deterministic ("det") and async mode, except `long` (deterministic only).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mpi_scenarios as scen
import numpy as np
import pytest
from launching import (
    REPO_ROOT,
    describe,
    kill_job,
    mpi_env,
    ppruntime_cmd,
    run_mpi,
    start_mpi,
    wait_mpi,
)
from model_fixtures import ARCHITECTURES, load_reference_model, make_tiny_checkpoint
from reference_compare import compare_greedy, hf_greedy_reference

JOB_TIMEOUT_S = 240
LOGPROB_ATOL = 1e-4  # log-probs: float32 compute, different batch shapes
LOGITS_ATOL = 2e-4  # raw logits are O(1..10)
LOGITS_RTOL = 1e-4
SLICE_BYTES = 2 * 1024 * 1024

JOBS: dict[str, dict] = {
    "pp1": {"n": 1, "scenario": "greedy,features,sliced,long,shutdown"},
    "pp2": {
        "n": 2,
        "scenario": "greedy,features,sliced,long,shutdown,abort,cadence",
        "partition": "4,1",
        "sliced_partition": "2,1",
    },
    "pp3": {
        "n": 3,
        "scenario": "greedy,features,sliced,shutdown,abort,cadence",
        "partition": "1,3,1",
        "sliced_partition": "1,1,1",
    },
    "pp4": {"n": 4, "scenario": "greedy,shutdown", "partition": "2,1,1,1"},
    "pp2-slow": {
        "n": 2,
        "scenario": "greedy,shutdown",
        "partition": "4,1",
        "env": {"PPRUNTIME_STAGE_DELAY_MS": "1:20"},
    },
    "pp3-slow": {
        "n": 3,
        "scenario": "greedy,shutdown",
        "partition": "1,3,1",
        "archs": "llama",
        "env": {"PPRUNTIME_STAGE_DELAY_MS": "1:20"},
    },
}
PP_JOBS = ("pp1", "pp2", "pp3", "pp4")
FEATURE_JOBS = ("pp2", "pp3")
MODES = ("det", "async")
pytestmark = pytest.mark.timeout(2 * JOB_TIMEOUT_S + 60)  # a test may start two jobs


# ------------------------------------------------------------------------------------
# fixtures: checkpoints, transformers reference, MPI jobs
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    """One directory with every checkpoint the scenarios load (see mpi_scenarios)."""
    root = tmp_path_factory.mktemp("pp_ckpts")
    for arch in ARCHITECTURES:
        make_tiny_checkpoint(root, arch)  # 5 layers, vocab 300
    special = {
        "features": dict(arch="llama", seed=3, with_tokenizer=True),
        # prompt logits of 300 tokens x 4096 x 4 B = 4.9 MB > one 2 MiB slice
        "sliced": dict(
            arch="llama", seed=4, vocab_size=4096, num_hidden_layers=3, max_position_embeddings=512
        ),
        # 16k-token prompt: long positions, small hidden size
        "long": dict(
            arch="llama",
            seed=5,
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,  # prefill attention scores are [heads, 2048, 16k]
            num_key_value_heads=1,
            max_position_embeddings=16400,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        ),
    }
    for name, spec in special.items():
        spec = dict(spec)
        arch = spec.pop("arch")
        built = make_tiny_checkpoint(root / f"_{name}", arch, **spec)
        shutil.move(str(built), str(root / name))
    return root


@pytest.fixture(scope="module")
def reference(ckpt_root):
    """arch -> GreedyReference of scen.greedy_prompts() (transformers, eager, float32)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            arch: hf_greedy_reference(
                load_reference_model(ckpt_root / arch),
                scen.greedy_prompts(),
                scen.GREEDY_MAX_TOKENS,
            )
            for arch in ARCHITECTURES
        }
    finally:
        torch.set_num_threads(threads)


# The order the tests first need the jobs in: while one job runs, the next is started
# too (two at a time), so that one job's single rank, waits and delays leave no core idle.
JOB_ORDER = ("pp1", "pp2", "pp3", "pp4", "pp2-slow", "pp3-slow")


class Jobs:
    """Runs each job of JOBS at most once; results (or the failure) are kept."""

    def __init__(self, ckpt_root: Path, out_dir: Path) -> None:
        self.ckpt_root = ckpt_root
        self.out_dir = out_dir
        self.results: dict[str, dict] = {}
        self.arrays: dict[str, dict[str, np.ndarray]] = {}
        self.failures: dict[str, str] = {}
        self.running: dict[str, subprocess.Popen] = {}

    def __call__(self, name: str) -> dict:
        if name in self.failures:
            pytest.fail(self.failures[name], pytrace=False)
        if name not in self.results:
            self._run(name)
        return self.results[name]

    def array(self, job: str, key: str) -> np.ndarray:
        self(job)
        return self.arrays[job][key]

    def start(self, name: str) -> None:
        """Start job `name` in the background (if it has not run yet)."""
        if name in self.running or name in self.results or name in self.failures:
            return
        spec = JOBS[name]
        args = [sys.executable, str(REPO_ROOT / "tests" / "mpi_scenarios.py")]
        args += ["--scenario", spec["scenario"], "--ckpt-root", str(self.ckpt_root)]
        args += ["--out", str(self._out(name)), "--repeat-det", ",".join(ARCHITECTURES)]
        if "partition" in spec:
            args += ["--layer-partition", spec["partition"]]
        if "sliced_partition" in spec:
            args += ["--sliced-partition", spec["sliced_partition"]]
        if "archs" in spec:
            args += ["--archs", spec["archs"]]
        env = {"PPRUNTIME_DEVICE": "cpu", "PPRUNTIME_TORCH_THREADS": "1", **spec.get("env", {})}
        self.running[name] = start_mpi(spec["n"], args, env=env)

    def close(self) -> None:
        """End the jobs started ahead that no test waited for."""
        for proc in self.running.values():
            kill_job(proc)
        self.running.clear()

    def _out(self, name: str) -> Path:
        return self.out_dir / f"{name}.json"

    def _run(self, name: str) -> None:
        self.start(name)
        if name in JOB_ORDER[:-1]:
            self.start(JOB_ORDER[JOB_ORDER.index(name) + 1])
        out = self._out(name)
        try:
            result = wait_mpi(self.running.pop(name), timeout=JOB_TIMEOUT_S)
        except AssertionError as error:  # timed out (and killed)
            self.failures[name] = f"job {name}: {error}"
            raise
        if result.returncode != 0 or not out.exists():
            self.failures[name] = f"job {name} failed:\n{describe(result)}"
            pytest.fail(self.failures[name], pytrace=False)
        self.results[name] = json.loads(out.read_text())
        npz = out.with_suffix(".npz")
        self.arrays[name] = dict(np.load(npz)) if npz.exists() else {}


@pytest.fixture(scope="module")
def jobs(ckpt_root, tmp_path_factory) -> Jobs:
    started = Jobs(ckpt_root, tmp_path_factory.mktemp("pp_jobs"))
    started.start(JOB_ORDER[0])  # while the transformers reference is computed
    yield started
    started.close()


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------
def assert_kv_all_free(reports: list[dict], world: int, what: str) -> None:
    assert len(reports) == world, f"{what}: {len(reports)} rank reports for {world} ranks"
    for report in reports:
        assert report["kv_blocks_free"] == report["kv_blocks_total"], (
            f"{what}: rank {report['rank']} has "
            f"{report['kv_blocks_total'] - report['kv_blocks_free']} KV blocks still in use "
            f"({report})"
        )


def chosen_logprobs(record: dict) -> np.ndarray:
    """Log-prob of each generated token, from the record's per-step dicts."""
    return np.array(
        [step[str(token)] for step, token in zip(record["logprobs"], record["token_ids"])]
    )


def own_top2(records: list[dict]) -> list[np.ndarray]:
    """[N, 2] best two log-probs per step of each record (needs logprobs >= 2)."""
    tops = []
    for record in records:
        rows = []
        for step in record["logprobs"]:
            values = sorted(step.values(), reverse=True)
            rows.append(values[:2] if len(values) >= 2 else [values[0], -np.inf])
        tops.append(np.array(rows, dtype=np.float64).reshape(-1, 2))
    return tops


def compare_to(base: list[dict], other: list[dict]) -> list[str]:
    """Greedy tokens of `other` vs `base`, `base`'s own top-2 deciding near-ties."""
    return compare_greedy(
        [r["token_ids"] for r in base], own_top2(base), [r["token_ids"] for r in other]
    )


def assert_logprobs_close(base: dict, other: dict, what: str) -> None:
    """Chosen-token log-probs agree over the prefix where the tokens agree."""
    agree = 0
    for a, b in zip(base["token_ids"], other["token_ids"]):
        if a != b:
            break
        agree += 1
    np.testing.assert_allclose(
        chosen_logprobs(other)[:agree],
        chosen_logprobs(base)[:agree],
        atol=LOGPROB_ATOL,
        err_msg=what,
    )


def joined(deltas: list[dict]) -> tuple[list[int], str]:
    tokens = [t for delta in deltas for t in delta["token_ids"]]
    return tokens, "".join(delta["text"] for delta in deltas)


# ------------------------------------------------------------------------------------
# greedy tokens: every PP size, both modes, vs transformers and vs each other
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", PP_JOBS)
def test_greedy_matches_transformers(jobs, reference, job):
    greedy = jobs(job)["greedy"]
    problems = []
    for arch in ARCHITECTURES:
        ref = reference[arch]
        for mode in MODES:
            records = greedy[f"{arch}/{mode}"]["greedy"]
            assert [r["finish_reason"] for r in records] == ["length"] * len(records)
            mismatches = compare_greedy(
                ref.tokens,
                ref.top2_logprobs,
                [r["token_ids"] for r in records],
                reference_top2_ids=ref.top2_ids,
            )
            problems += [f"{job} {arch} {mode}: {m}" for m in mismatches]
            for index, record in enumerate(records):
                agree = 0
                for want, got in zip(ref.tokens[index], record["token_ids"]):
                    if want != got:
                        break
                    agree += 1
                diff = np.abs(chosen_logprobs(record)[:agree] - ref.chosen_logprobs[index][:agree])
                if diff.size and diff.max() > LOGPROB_ATOL:
                    problems.append(
                        f"{job} {arch} {mode} prompt {index}: log-probs differ from "
                        f"transformers by up to {diff.max():.3g}"
                    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("job", ["pp2", "pp3", "pp4"])
def test_pp_sizes_agree_with_pp1(jobs, job):
    base, other = jobs("pp1")["greedy"], jobs(job)["greedy"]
    problems = []
    for arch in ARCHITECTURES:
        for mode in MODES:
            key = f"{arch}/{mode}"
            mismatches = compare_to(base[key]["greedy"], other[key]["greedy"])
            problems += [f"{job} {key} greedy: {m}" for m in mismatches]
            for index, (a, b) in enumerate(zip(base[key]["greedy"], other[key]["greedy"])):
                assert_logprobs_close(a, b, f"{job} {key} greedy prompt {index}")
            # seeded sampling: the same tokens whatever the PP size, batch or mode
            for index, (a, b) in enumerate(zip(base[key]["sampled"], other[key]["sampled"])):
                if a["token_ids"] != b["token_ids"]:
                    problems.append(
                        f"{job} {key} sampled prompt {index} (seed {10 + index}): "
                        f"PP=1 {a['token_ids']} vs {b['token_ids']}"
                    )
                else:
                    assert_logprobs_close(a, b, f"{job} {key} sampled prompt {index}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("job", PP_JOBS)
def test_modes_agree_and_kv_freed(jobs, job):
    """Async and deterministic mode give the same tokens; every engine freed its KV."""
    result = jobs(job)
    greedy = result["greedy"]
    for key, record in greedy.items():
        assert_kv_all_free(record["reports"], result["world_size"], f"{job} {key}")
    for arch in ARCHITECTURES:
        det, asy = greedy[f"{arch}/det"], greedy[f"{arch}/async"]
        mismatches = compare_to(det["greedy"], asy["greedy"])
        assert not mismatches, f"{job} {arch}: async vs det:\n" + "\n".join(mismatches)
        assert [r["token_ids"] for r in det["sampled"]] == [
            r["token_ids"] for r in asy["sampled"]
        ], f"{job} {arch}: seeded sampling differs between async and det mode"


# ------------------------------------------------------------------------------------
# deterministic mode: bitwise-identical reruns (also across jobs and stage timing)
# ------------------------------------------------------------------------------------
def _bitwise_view(record: dict) -> dict:
    return {
        kind: [(r["token_ids"], r["logprobs"]) for r in record[kind]]
        for kind in ("greedy", "sampled")
    }


@pytest.mark.parametrize("job", PP_JOBS)
def test_deterministic_rerun_is_bitwise_identical(jobs, job):
    greedy = jobs(job)["greedy"]
    for arch in ARCHITECTURES:
        first, again = greedy[f"{arch}/det"], greedy[f"{arch}/det_repeat"]
        assert _bitwise_view(first) == _bitwise_view(again), (
            f"{job} {arch}: a second deterministic run gave different tokens or log-probs"
        )


@pytest.mark.parametrize(("slow", "base"), [("pp2-slow", "pp2"), ("pp3-slow", "pp3")])
def test_deterministic_is_bitwise_identical_with_a_slow_stage(jobs, slow, base):
    """Another job, with stage 1 sleeping 20 ms per forward: still the same bits."""
    slowed, normal = jobs(slow)["greedy"], jobs(base)["greedy"]
    for key in slowed:
        if not key.endswith("/det"):
            continue
        assert _bitwise_view(slowed[key]) == _bitwise_view(normal[key]), (
            f"{slow} {key}: deterministic results change when stage 1 is slow"
        )


# ------------------------------------------------------------------------------------
# a slowed stage: correct tokens in both modes, KV freed, clean shutdown
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["pp2-slow", "pp3-slow"])
def test_slow_stage_gives_correct_tokens(jobs, reference, job):
    result = jobs(job)
    problems = []
    for key, record in result["greedy"].items():
        arch, mode = key.split("/")
        ref = reference[arch]
        mismatches = compare_greedy(
            ref.tokens,
            ref.top2_logprobs,
            [r["token_ids"] for r in record["greedy"]],
            reference_top2_ids=ref.top2_ids,
        )
        problems += [f"{job} {key}: {m}" for m in mismatches]
        pp1 = jobs("pp1")["greedy"][f"{arch}/{mode.replace('_repeat', '')}"]
        if [r["token_ids"] for r in record["sampled"]] != [r["token_ids"] for r in pp1["sampled"]]:
            problems.append(f"{job} {key}: seeded sampling differs from PP=1")
        assert_kv_all_free(record["reports"], result["world_size"], f"{job} {key}")
    assert not problems, "\n".join(problems)
    for key, record in result["shutdown"].items():
        assert_kv_all_free(record["reports"], result["world_size"], f"{job} shutdown {key}")


# ------------------------------------------------------------------------------------
# streaming, stop strings, abort, log-probs, prompt and generation logits
# ------------------------------------------------------------------------------------
def _check_features_self_consistent(feat: dict, what: str) -> None:
    plain = feat["plain"]
    # streaming: deltas concatenate to the final output; one final delta, last
    assert len(feat["stream"]) == len(plain)
    for index, (deltas, final) in enumerate(zip(feat["stream"], plain)):
        tokens, text = joined(deltas)
        assert tokens == final["token_ids"], f"{what} stream {index}: tokens"
        assert text == final["text"], f"{what} stream {index}: text"
        assert [d["finished"] for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1]["finish_reason"] == final["finish_reason"] == "length"
        assert len(deltas) > 2, f"{what} stream {index}: not streamed ({len(deltas)} deltas)"
    # stop string: the text ends right before the stop word, finish reason "stop"
    stop_word = feat["stop_word"]
    (stopped,) = feat["stop"]
    full_text = plain[0]["text"]
    assert stop_word in full_text
    assert stopped["finish_reason"] == "stop", f"{what}: {stopped}"
    assert stopped["stop_reason"] == stop_word
    assert stopped["text"] == full_text[: full_text.index(stop_word)], f"{what}: {stopped}"
    assert stopped["token_ids"] == plain[0]["token_ids"][: len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) < len(plain[0]["token_ids"])
    tokens, text = joined(feat["stop_stream"])
    assert text == stopped["text"], f"{what}: streamed text with a stop string"
    assert feat["stop_stream"][-1]["finish_reason"] == "stop"
    # log-probs and logits agree with each other and with the tokens
    for index, record in enumerate(feat["heavy"]):
        assert len(record["logprobs"]) == len(record["token_ids"]) == 8
        for step, token in zip(record["logprobs"], record["token_ids"]):
            assert len(step) >= 3
            assert max(step, key=step.get) == str(token), f"{what} heavy {index}: not greedy"
    # abort: the aborted request ends with "abort"; the other is not disturbed
    abort = feat["abort"]
    assert feat["abort_accepted"] is True
    assert feat["abort_unknown"] is False
    assert abort["victim"]["finish_reason"] == "abort", f"{what}: {abort['victim']}"
    assert feat["victim_tokens_before_abort"] >= 3
    assert feat["victim_tokens_before_abort"] <= len(abort["victim"]["token_ids"]) < 200
    assert abort["keeper"]["finish_reason"] == "length"
    assert abort["keeper"]["token_ids"] == feat["keeper_alone"]["token_ids"]
    assert len(abort["keeper"]["token_ids"]) == 30


def _check_logits(jobs, job: str, mode: str, feat: dict, base_job: str, base: dict) -> None:
    for index, (a, b) in enumerate(zip(base["heavy"], feat["heavy"])):
        what = f"{job} {mode} heavy {index}"
        assert a["token_ids"] == b["token_ids"], what
        assert a["prompt_token_ids"] == b["prompt_token_ids"], what
        for step_a, step_b in zip(a["logprobs"], b["logprobs"]):
            assert step_a.keys() == step_b.keys(), what
            np.testing.assert_allclose(
                list(step_b.values()),
                [step_a[k] for k in step_b],
                atol=LOGPROB_ATOL,
                err_msg=what,
            )
        for kind in ("prompt_logits", "generation_logits"):
            ours = jobs.array(job, b[kind])
            theirs = jobs.array(base_job, a[kind])
            rows = len(b["prompt_token_ids"]) if kind == "prompt_logits" else 8
            assert ours.shape == (rows, 300), f"{what} {kind} shape {ours.shape}"
            np.testing.assert_allclose(
                ours, theirs, rtol=LOGITS_RTOL, atol=LOGITS_ATOL, err_msg=f"{what} {kind}"
            )
        # generation logits and log-probs describe the same distribution
        logits = jobs.array(job, b["generation_logits"]).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        np.testing.assert_allclose(
            logits[np.arange(8), b["token_ids"]] - logz,
            chosen_logprobs(b),
            atol=LOGPROB_ATOL,
            err_msg=f"{what}: log-probs vs log_softmax(generation_logits)",
        )
        assert logits.argmax(-1).tolist() == b["token_ids"], what


@pytest.mark.parametrize("job", ["pp1", *FEATURE_JOBS])
def test_features_self_consistent(jobs, job):
    result = jobs(job)
    for mode in MODES:
        feat = result["features"][mode]
        _check_features_self_consistent(feat, f"{job} {mode}")
        assert_kv_all_free(feat["reports"], result["world_size"], f"{job} features {mode}")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _visible(record: dict) -> dict:
    """What a user sees of an output, apart from log-probs and logits."""
    return {k: record[k] for k in ("token_ids", "text", "finish_reason", "stop_reason")}


@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_features_equal_pp1(jobs, job):
    base_all, result = jobs("pp1")["features"], jobs(job)["features"]
    for mode in MODES:
        base, feat = base_all[mode], result[mode]
        for kind in ("plain", "stop", "keeper_alone"):
            got, want = _as_list(feat[kind]), _as_list(base[kind])
            assert [_visible(r) for r in got] == [_visible(r) for r in want], (
                f"{job} {mode} {kind}: differs from PP=1"
            )
        assert [joined(d) for d in feat["stream"]] == [joined(d) for d in base["stream"]]
        assert joined(feat["stop_stream"]) == joined(base["stop_stream"])
        assert feat["abort"]["keeper"]["token_ids"] == base["abort"]["keeper"]["token_ids"]
        _check_logits(jobs, job, mode, feat, "pp1", base)


def test_pp1_logits_match_transformers(jobs, ckpt_root):
    """Anchor the PP=1 logits the other sizes are compared with to transformers."""
    import torch

    feat = jobs("pp1")["features"]["det"]
    model = load_reference_model(ckpt_root / "features")
    for index, record in enumerate(feat["heavy"]):
        prompt, tokens = record["prompt_token_ids"], record["token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0].numpy()
        n = len(prompt)
        np.testing.assert_allclose(
            jobs.array("pp1", record["prompt_logits"]),
            logits[:n],
            rtol=LOGITS_RTOL,
            atol=LOGITS_ATOL,
            err_msg=f"prompt logits {index}",
        )
        np.testing.assert_allclose(
            jobs.array("pp1", record["generation_logits"]),
            logits[n - 1 : n - 1 + len(tokens)],
            rtol=LOGITS_RTOL,
            atol=LOGITS_ATOL,
            err_msg=f"generation logits {index}",
        )


# ------------------------------------------------------------------------------------
# large payloads: prompt logits over 2 MiB travel sliced; a 16k-token prompt
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["pp2", "pp3"])
@pytest.mark.parametrize("mode", MODES)
def test_large_prompt_logits_travel_sliced(jobs, ckpt_root, mode, job):
    """The diff goes from the last rank to rank 0 only: no other rank sends or receives
    it (at PP=3 the middle rank would otherwise get it on the ring)."""
    import torch

    base, piped = jobs("pp1")["sliced"][mode], jobs(job)["sliced"][mode]
    world = jobs(job)["world_size"]
    assert piped["prompt_logits_bytes"] > 2 * SLICE_BYTES
    # the last rank cut the diff into slices and rank 0 reassembled them
    assert piped["sliced_sends"][-1] >= 1, piped["sliced_sends"]
    assert piped["sliced_recvs"][0] >= 1, piped["sliced_recvs"]
    assert piped["sliced_sends"][:-1] == [0] * (world - 1), piped["sliced_sends"]
    assert piped["sliced_recvs"][1:] == [0] * (world - 1), piped["sliced_recvs"]
    assert base["sliced_sends"] == [0] and base["sliced_recvs"] == [0]
    assert piped["token_ids"] == base["token_ids"]
    ours = jobs.array(job, piped["prompt_logits"])
    theirs = jobs.array("pp1", base["prompt_logits"])
    assert ours.shape == (scen.SLICED_PROMPT_TOKENS, 4096)
    np.testing.assert_allclose(ours, theirs, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
    model = load_reference_model(ckpt_root / "sliced")
    with torch.no_grad():
        logits = model(torch.tensor([piped["prompt_token_ids"]])).logits[0].numpy()
    np.testing.assert_allclose(ours, logits, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)
    assert_kv_all_free(piped["reports"], world, f"sliced {job} {mode}")


def test_16k_prompt_is_chunked_through_pp2(jobs):
    base, piped = jobs("pp1")["long"], jobs("pp2")["long"]
    for record in (base, piped):
        assert record["prompt_len"] == scen.LONG_PROMPT_TOKENS
        assert record["finish_reason"] == "length"
        assert len(record["token_ids"]) == scen.LONG_MAX_TOKENS
    # first tokens equal PP=1's (a near-tie may legitimately diverge)
    first = 4
    trimmed = [
        {**r, "token_ids": r["token_ids"][:first], "logprobs": r["logprobs"][:first]}
        for r in (base, piped)
    ]
    mismatches = compare_to([trimmed[0]], [trimmed[1]])
    assert not mismatches, "\n".join(mismatches)
    assert_kv_all_free(piped["reports"], 2, "long pp2")


# ------------------------------------------------------------------------------------
# shutdown with requests in flight
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", PP_JOBS)
def test_shutdown_with_requests_in_flight_frees_everything(jobs, job):
    """The job went on after these engines and exited 0; every rank freed its KV."""
    result = jobs(job)
    assert sorted(result["shutdown"]) == sorted(
        f"{mode}/{steps}" for mode in MODES for steps in scen.SHUTDOWN_AFTER_STEPS
    )
    for key, record in result["shutdown"].items():
        assert record["finished_before_shutdown"] == [], "requests were not in flight"
        assert_kv_all_free(record["reports"], result["world_size"], f"{job} shutdown {key}")


# ------------------------------------------------------------------------------------
# abort of a request in flight at PP >= 2, during a prefill chunk and mid-decode
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_abort_in_flight_ends_abort_soon_and_frees_kv_everywhere(jobs, job):
    result = jobs(job)
    world = result["world_size"]
    assert sorted(result["abort"]) == sorted(
        f"{mode}/{when}" for mode in MODES for when in ("prefill", "decode")
    )
    for key, record in result["abort"].items():
        mode, when = key.split("/")
        what = f"{job} abort {key}: {record}"
        assert sorted(record["outputs"]) == ["keeper", "victim"], f"not finished: {what}"
        victim, keeper = record["outputs"]["victim"], record["outputs"]["keeper"]
        # the abort hit the request while one of its microbatches was in the pipeline
        assert record["in_flight_at_abort"] and not record["victim_finished_before_abort"], what
        assert record["abort_accepted"] is True, what
        if when == "prefill":  # one chunk computed of a prompt that needs several
            assert 0 < record["computed_at_abort"] < scen.ABORT_PROMPT_TOKENS, what
            assert victim["token_ids"] == [], what
        else:
            assert record["tokens_at_abort"] >= 3, what
            assert (
                record["tokens_at_abort"]
                <= len(victim["token_ids"])
                <= record["tokens_at_abort"] + 1  # the batch in flight may add one
            ), what
        assert victim["finish_reason"] == "abort", what
        # bounded: the batch in flight lands (deterministic: within pp_size iterations)
        bound = world if mode == "det" else 2 * world + 2
        assert 0 < record["abort_iterations"] <= bound, what
        assert keeper["finish_reason"] == "length" and len(keeper["token_ids"]) == 10, what
        free, total = record["rank0_kv_free"]
        assert free == total, what
        # nothing was unfinished at shutdown: the reports show what the abort freed
        assert_kv_all_free(record["reports"], world, f"{job} abort {key}")


# ------------------------------------------------------------------------------------
# deterministic cadence, microbatch slots, KV capacity agreed over ranks
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_deterministic_batch_is_handled_pp_size_iterations_later(jobs, job):
    """A lone request: scheduled in iteration 0, each batch handled pp_size iterations
    after it was scheduled, so token k arrives in step k * pp_size."""
    cadence = jobs(job)["cadence"]
    world = jobs(job)["world_size"]
    expected = [world * (k + 1) for k in range(scen.CADENCE_TOKENS)]
    assert cadence["arrival_steps"] == expected, cadence


@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_microbatch_slots_per_mode(jobs, job):
    """pp_size slots in deterministic mode, max(pp_size, 4) in async mode."""
    result = jobs(job)
    world = result["world_size"]
    assert result["cadence"]["slots"] == world
    for key, record in result["abort"].items():
        expected = world if key.startswith("det/") else max(world, 4)
        assert record["slots"] == expected, f"{job} {key}: {record['slots']} slots"


@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_kv_capacity_is_the_minimum_over_ranks(jobs, job):
    """With a memory budget, stages with more layers afford fewer blocks; all use the
    fewest (uneven partitions 4,1 and 1,3,1)."""
    cadence = jobs(job)["cadence"]
    local = cadence["local_blocks"]
    assert len(set(local)) > 1, f"{job}: the ranks' budgets do not differ: {local}"
    totals = [report["kv_blocks_total"] for report in cadence["reports"]]
    assert totals == [min(local)] * len(local), f"{job}: local {local}, used {totals}"
    assert_kv_all_free(cadence["reports"], len(local), f"{job} cadence")


@pytest.mark.parametrize("job", FEATURE_JOBS)
def test_communicators_are_freed_at_shutdown(jobs, job):
    """Every rank's pipeline, relay and watchdog communicators are MPI_COMM_NULL after
    shutdown (an engine per scenario in one job: a leak would pile up)."""
    cadence = jobs(job)["cadence"]
    world = jobs(job)["world_size"]
    assert cadence["comms_freed"] == [[True, True, True]] * world, cadence["comms_freed"]


# ------------------------------------------------------------------------------------
# the command line, streaming, under mpirun
# ------------------------------------------------------------------------------------
def test_cli_stream_under_mpirun():
    args = [*ppruntime_cmd(), "generate", "--prompt", "hello", "--max-tokens", "16", "--stream"]
    result = run_mpi(2, args, timeout=120, env={"PPRUNTIME_DEVICE": "cpu"})
    assert result.returncode == 0, describe(result)
    streamed = result.stdout.strip()
    assert streamed, f"nothing streamed:\n{describe(result)}"
    # the streamed text is what a single process generates for the same request
    single = subprocess.run(
        [*ppruntime_cmd(), "generate", "--prompt", "hello", "--max-tokens", "16", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=mpi_env({"PPRUNTIME_DEVICE": "cpu"}),
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = json.loads(single.stdout.strip().splitlines()[-1])
    assert len(expected["token_ids"]) == 16
    assert streamed == expected["text"].strip()
