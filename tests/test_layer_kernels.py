"""The Triton layer kernels against the torch LayerOps (the reference), and a whole tiny
checkpoint decoded greedily with the triton layer ops against transformers.

Without a GPU the kernels run interpreted on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported). On a GPU they are compiled and run on CUDA tensors; run with
TRITON_INTERPRET=1 to also check the CPU cases there. The interpreter rounds float32 to
bfloat16 by truncation (the GPU rounds to nearest), so bfloat16 results may differ from
torch by one or two units in the last place: the tolerances allow that, no more.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")

from model_fixtures import PagedBatches, load_reference_model, make_tiny_checkpoint

from ppruntime.config import ConfigError
from ppruntime.model import ModelConfig, allocate_kv_cache, load_stage_model
from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.layer_ops import (
    TorchLayerOps,
    TritonLayerOps,
    select_layer_ops,
)
from ppruntime.model.partition import partition_layers
from ppruntime.model.rope import rope_inverse_frequencies

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETED, reason="Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        ),
    ),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
    ),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) for O(1) values: a few units in the last place of each dtype
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
EPS = 1e-6
REFERENCE = TorchLayerOps()


@pytest.fixture(scope="module")
def triton_ops() -> TritonLayerOps:
    return TritonLayerOps()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=rtol, atol=atol)


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)


def norm_weight(size: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(size, generator=generator)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [72, 200])
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_rms_norm_and_fused_add(triton_ops, device, dtype, hidden, num_tokens):
    x = 3.0 * randn(num_tokens, hidden, dtype=dtype, device=device, seed=1)
    residual = randn(num_tokens, hidden, dtype=dtype, device=device, seed=2)
    weight = norm_weight(hidden, dtype, device, seed=3)
    x_before, residual_before = x.clone(), residual.clone()

    assert_matches(triton_ops.rms_norm(x, weight, EPS), REFERENCE.rms_norm(x, weight, EPS))
    normed, new_residual = triton_ops.add_rms_norm(x, residual, weight, EPS)
    expected_normed, expected_residual = REFERENCE.add_rms_norm(x, residual, weight, EPS)
    assert_matches(new_residual, expected_residual)
    assert_matches(normed, expected_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_of_heads_and_of_no_tokens(triton_ops, device):
    """3-D input (per-head norm) and an empty batch."""
    x = randn(3, 4, 24, dtype=torch.float32, device=device, seed=4)
    weight = norm_weight(24, torch.float32, device, seed=5)
    assert_matches(triton_ops.rms_norm(x, weight, EPS), REFERENCE.rms_norm(x, weight, EPS))
    empty = x[:0, 0]
    assert triton_ops.rms_norm(empty, weight, EPS).shape == (0, 24)
    normed, residual = triton_ops.add_rms_norm(empty, empty, weight, EPS)
    assert normed.shape == residual.shape == (0, 24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inner", [88, 1100])  # 1100: more than one column block
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_silu_and_mul(triton_ops, device, dtype, inner, num_tokens):
    gate_up = 2.0 * randn(num_tokens, 2 * inner, dtype=dtype, device=device, seed=6)
    out = triton_ops.silu_and_mul(gate_up)
    assert out.shape == (num_tokens, inner)
    assert_matches(out, REFERENCE.silu_and_mul(gate_up))


ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
}


def rope_config(head_dim: int, scaling: str) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=1 if head_dim == 96 else 2,  # 96: one KV head (MQA)
        head_dim=head_dim,
        rope_theta=10000.0,
        rope_scaling=ROPE_SCALINGS[scaling],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_qkv_rope(triton_ops, device, dtype, head_dim, scaling, qk_norm):
    config = rope_config(head_dim, scaling)
    num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    num_tokens = 1 if head_dim == 80 else 5
    inv_freq = rope_inverse_frequencies(config).to(device)
    positions = torch.tensor([0, 3, 250, 1023, 4097][:num_tokens], device=device)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = randn(num_tokens, width, dtype=dtype, device=device, seed=head_dim)
    q_weight = norm_weight(head_dim, dtype, device, seed=7) if qk_norm else None
    k_weight = norm_weight(head_dim, dtype, device, seed=8) if qk_norm else None
    heads = (num_heads, num_kv_heads, head_dim, q_weight, k_weight, EPS)

    expected = REFERENCE.qkv_rope(
        qkv.clone(), REFERENCE.rope_tables(inv_freq, positions, dtype), *heads
    )
    rotated = qkv.clone()
    q, k, v = triton_ops.qkv_rope(
        rotated, triton_ops.rope_tables(inv_freq, positions, dtype), *heads
    )
    assert_matches(q, expected.q)
    assert_matches(k, expected.k)
    assert torch.equal(v, expected.v)
    # in place: q, k, v are views of the projection's output, no copies
    assert q.data_ptr() == rotated.data_ptr()
    assert k.data_ptr() == rotated.data_ptr() + num_heads * head_dim * rotated.element_size()
    assert torch.equal(rotated[:, -num_kv_heads * head_dim :], qkv[:, -num_kv_heads * head_dim :])


def test_select_layer_ops(monkeypatch):
    assert select_layer_ops(None, "cpu").name == "torch"
    assert select_layer_ops("torch", "cpu").name == "torch"
    assert select_layer_ops("triton", "cuda").name == "triton"
    assert select_layer_ops(None, "cuda").name == "triton"
    with pytest.raises(ConfigError, match="unknown layer ops 'cudnn'; choose from torch, triton"):
        select_layer_ops("cudnn", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="triton layer ops run on CUDA devices"):
        select_layer_ops("triton", "cpu")


# --- a whole checkpoint with the triton layer ops (torch attention) vs transformers ---

PROMPTS = ([5, 17, 42, 9, 100, 7, 250], [33, 8, 61])
NEW_TOKENS = 5


def greedy_reference(reference, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_id = reference(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def to_device(metadata: AttentionMetadata, device: str) -> AttentionMetadata:
    return AttentionMetadata(
        query_start_loc=metadata.query_start_loc.to(device),
        seq_lens=metadata.seq_lens.to(device),
        block_table=metadata.block_table.to(device),
        slot_mapping=metadata.slot_mapping.to(device),
        max_query_len=metadata.max_query_len,
        max_seq_len=metadata.max_seq_len,
    )


def greedy_with_stages(directory, partition, layer_ops, device) -> list[list[int]]:
    """Both prompts in one batch (prefill, then decode steps) through the pipeline stages."""
    config = load_stage_model(directory, partition_layers(1, 1)[0]).config
    specs = partition_layers(config.num_hidden_layers, len(partition), partition)
    stages = [load_stage_model(directory, s, device=device, layer_ops=layer_ops) for s in specs]
    caches = [allocate_kv_cache(config, s, 16, 4, device=device) for s in specs]
    paging = PagedBatches(16, 4)
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    step_tokens = [list(prompt) for prompt in PROMPTS]
    for _ in range(NEW_TOKENS):
        metadata, positions = paging.step([(i, len(t)) for i, t in enumerate(step_tokens)])
        hidden = torch.tensor([tok for tokens in step_tokens for tok in tokens], device=device)
        with torch.no_grad():
            for stage, cache in zip(stages, caches):
                hidden = stage(hidden, positions.to(device), to_device(metadata, device), cache)
            logits = stages[-1].compute_logits(hidden)
        ends = metadata.query_start_loc[1:].tolist()
        for i, end in enumerate(ends):
            next_id = int(logits[end - 1].argmax())
            outputs[i].append(next_id)
            step_tokens[i] = [next_id]
    return outputs


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """arch -> (directory, greedy reference tokens per prompt); Llama with llama3 rope
    scaling, Qwen3 with q/k-norm and a head_dim (24) that is not a power of two."""
    built = {}
    for arch in ("llama", "qwen3"):
        directory = make_tiny_checkpoint(
            tmp_path_factory.mktemp(arch), arch, num_hidden_layers=3, intermediate_size=100
        )
        reference = load_reference_model(directory)
        built[arch] = (directory, [greedy_reference(reference, p) for p in PROMPTS])
    return built


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_layer_ops_decode_like_transformers(tiny_checkpoints, triton_ops, arch, device):
    directory, expected = tiny_checkpoints[arch]
    assert greedy_with_stages(directory, (3,), triton_ops, device) == expected
    # across a stage boundary the residual stream is handed over whole
    assert greedy_with_stages(directory, (1, 2), triton_ops, device) == expected


def test_kernels_compile_for_a_gpu(tmp_path):
    """What the interpreter cannot check: every kernel variant compiles for sm_90 (no GPU
    needed; the triton wheel brings its own ptxas)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile_check.py")
    parts = 2  # two processes at once, each compiling every other variant on one core
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(part), str(parts)],
            env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"triton-cache-{part}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in range(parts)
    ]
    lines = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        lines += stdout.splitlines()
    assert len(lines) == len(set(lines)) == 31, "\n".join(lines)  # every variant, once


@pytest.mark.parametrize("device", DEVICES)
def test_skinny_gemm_layer_ops_decode_like_transformers(tiny_checkpoints, device, monkeypatch):
    """PPRUNTIME_SKINNY_GEMM's layer ops: every projection and the LM head of a prefill of
    10 tokens and the decode steps run the skinny GEMM (the tiny shapes are not in the
    table: the heuristic's launches, split-K where K allows), and greedy tokens still match."""
    from ppruntime.kernels import skinny_gemm

    monkeypatch.setenv(skinny_gemm.TABLE_ENV, "/nonexistent/skinny-table.json")
    shapes = []
    kernel = skinny_gemm.skinny_gemm

    def counted(x, weight, bias, config):
        shapes.append((x.shape[0], *weight.shape))
        return kernel(x, weight, bias, config)

    monkeypatch.setattr(skinny_gemm, "skinny_gemm", counted)
    directory, expected = tiny_checkpoints["llama"]
    assert greedy_with_stages(directory, (3,), TritonLayerOps(skinny_gemm=True), device) == expected
    # 3 layers x 4 projections + the LM head, per forward (a prefill and NEW_TOKENS - 1 decodes)
    assert len(shapes) == NEW_TOKENS * (3 * 4 + 1), shapes
    assert {rows for rows, _, _ in shapes} == {len(PROMPTS[0]) + len(PROMPTS[1]), len(PROMPTS)}


@pytest.mark.parametrize("device", DEVICES)
def test_fused_silu_down_layer_ops_decode_like_transformers(
    tiny_checkpoints, device, monkeypatch, tmp_path
):
    """A launch table with a fused SiLU-and-mul down projection for the tiny checkpoint's
    shape: every layer's MLP (prefill of 10 tokens and decode steps) runs the one fused
    kernel instead of silu_and_mul + the GEMM, and greedy tokens still match."""
    import json

    from ppruntime.kernels import activation, skinny_gemm

    fused = skinny_gemm.SkinnyConfig(block_m=16, block_n=32, block_k=32, split_k=2)
    table = tmp_path / "table.json"
    entry = {"op": "silu_mul_linear", "dtype": "float32", "m": 16, "n": 64, "k": 100}
    table.write_text(
        json.dumps({"device": "test", "entries": [{**entry, "config": fused.as_dict()}]})
    )
    monkeypatch.setenv(skinny_gemm.TABLE_ENV, str(table))
    launches, separate = [], []
    kernel, separate_kernel = skinny_gemm.skinny_gemm_silu_mul, activation.silu_and_mul
    monkeypatch.setattr(
        skinny_gemm,
        "skinny_gemm_silu_mul",
        lambda *args: launches.append(args[0].shape[0]) or kernel(*args),
    )
    monkeypatch.setattr(
        activation, "silu_and_mul", lambda gate_up: separate.append(1) or separate_kernel(gate_up)
    )
    directory, expected = tiny_checkpoints["llama"]
    ops = TritonLayerOps(skinny_gemm=True, measured_only=True)
    assert greedy_with_stages(directory, (3,), ops, device) == expected
    prefill = len(PROMPTS[0]) + len(PROMPTS[1])
    assert launches == [prefill] * 3 + [len(PROMPTS)] * 3 * (NEW_TOKENS - 1)
    assert not separate
