"""GPU checks: a stage on CUDA gives the CPU's numbers; PP=2 on one GPU goes through host memory.

Skipped on machines without a GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from launching import run_mpi
from model_fixtures import make_tiny_checkpoint

from ppruntime import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 5, 9, 13, 21, 34], [7, 3, 2], list(range(40, 80))]


def _run(model: str, device: str) -> list:
    with LLM(model, device=device, kv_cache_blocks=256, exit_workers=False) as llm:
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logits=True)
        return llm.generate([np.asarray(p) for p in PROMPTS], params)


def test_cuda_stage_matches_cpu(tmp_path):
    checkpoint = str(make_tiny_checkpoint(tmp_path, "llama"))
    on_cpu = _run(checkpoint, "cpu")
    on_gpu = _run(checkpoint, "cuda")
    for cpu_output, gpu_output in zip(on_cpu, on_gpu):
        np.testing.assert_allclose(gpu_output.prompt_logits, cpu_output.prompt_logits, atol=2e-3)
        assert gpu_output.token_ids[:4] == cpu_output.token_ids[:4]


def test_two_stages_share_one_gpu(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    command = [
        sys.executable,
        "-m",
        "ppruntime",
        "generate",
        "--preset",
        "tiny",
        "--device",
        "cuda",
        "--prompts-file",
        str(prompts),
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
    ]
    outputs = []
    for ranks in (1, 2):
        result = run_mpi(ranks, command, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append([json.loads(line)["token_ids"] for line in result.stdout.splitlines()])
    assert outputs[0] == outputs[1]
