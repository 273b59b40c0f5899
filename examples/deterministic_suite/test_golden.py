"""Tokens and log-probs of fixed prompts, checked against golden.json.

Tokens must be identical; log-probs equal within LOGPROB_TOLERANCE (a different CPU
may round the last bits differently). After a deliberate change, regenerate the file
with `--update-golden` and review its diff like code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppruntime import SamplingParams

GOLDEN = Path(__file__).resolve().parent / "golden.json"

PROMPTS = ["In the beginning", "And Jesus said unto them", "The LORD is"]
PARAMS = SamplingParams(max_tokens=16, temperature=0, logprobs=2)  # top-2 per token
LOGPROB_TOLERANCE = 1e-4


def record_of(output) -> dict:
    """What is compared: the tokens, and each step's top log-probs as [token, log-prob]."""
    return {
        "token_ids": output.token_ids,
        "logprobs": [sorted([t, round(v, 6)] for t, v in step.items()) for step in output.logprobs],
        "text": output.text,  # for the reader of the diff
    }


@pytest.fixture(scope="module")
def records(llm, update_golden) -> dict[str, dict]:
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    records = {prompt: record_of(output) for prompt, output in zip(PROMPTS, outputs)}
    if update_golden:  # one line per prompt: a readable diff
        lines = [
            f"  {json.dumps(prompt)}: {json.dumps(record)}" for prompt, record in records.items()
        ]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return records


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_golden(prompt: str, records: dict[str, dict]) -> None:
    golden = json.loads(GOLDEN.read_text())[prompt]
    got = records[prompt]
    assert got["token_ids"] == golden["token_ids"], f"{got['text']!r} != {golden['text']!r}"
    for step, (got_step, golden_step) in enumerate(zip(got["logprobs"], golden["logprobs"])):
        assert [t for t, _ in got_step] == [t for t, _ in golden_step], f"step {step}"
        for (_, value), (_, expected) in zip(got_step, golden_step):
            assert value == pytest.approx(expected, abs=LOGPROB_TOLERANCE), f"step {step}"


def test_same_tokens_when_run_again(llm, records: dict[str, dict]) -> None:
    """Deterministic mode: a second run in the same session gives the same outputs."""
    again = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [record_of(output) for output in again] == [records[p] for p in PROMPTS]
