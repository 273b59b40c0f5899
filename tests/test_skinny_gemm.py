"""The skinny decode GEMM (ppruntime/kernels/skinny_gemm.py) against torch, its launch
table, and the LayerOps `linear` that routes the projections and the LM head through it;
its SiLU-and-multiply fused variant against the two-kernel path (silu_and_mul, then the
GEMM) and torch, its table entries and the LayerOps `silu_mul_linear` that runs it.

Without a GPU the kernel runs interpreted on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported); shapes are tiny. The interpreter's bfloat16 dot is wrong, so
there the kernel upcasts its operands (UPCAST); the GPU compiles the bf16 dot itself
(tests/kernel_compile_check.py checks that for sm_90).
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton", reason="the triton package is not installed")

import torch.nn.functional as F

from ppruntime.config import ConfigError
from ppruntime.kernels import activation
from ppruntime.kernels import skinny_gemm as sg
from ppruntime.kernels.skinny_gemm import (
    SkinnyConfig,
    silu_mul_config,
    skinny_config,
    skinny_gemm,
    skinny_gemm_silu_mul,
)
from ppruntime.model.layer_ops import TorchLayerOps, TritonLayerOps, select_layer_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton runs on CPU tensors only with TRITON_INTERPRET=1", allow_module_level=True)

# every switch of the kernel at least once: both tile orientations, split-K by partials
# and by atomics (with more splits than K tiles: empty splits), TMA weights, tiles that
# neither M (5, 17: two M tiles at 16) nor N (40) nor K (72) fill
CONFIGS = {
    "swap": SkinnyConfig(block_m=16, block_n=16, block_k=16),
    "no-swap": SkinnyConfig(block_m=16, block_n=32, block_k=32, swap_ab=False),
    "partials": SkinnyConfig(block_m=16, block_n=16, block_k=16, split_k=3),
    "atomic": SkinnyConfig(block_m=32, block_n=16, block_k=32, split_k=2, reduction="atomic"),
    "atomic-no-swap-empty-splits": SkinnyConfig(
        block_m=16, block_n=16, block_k=32, split_k=8, reduction="atomic", swap_ab=False
    ),
    "descriptor": SkinnyConfig(block_m=16, block_n=16, block_k=16, weights="descriptor"),
    "descriptor-partials": SkinnyConfig(
        block_m=16, block_n=32, block_k=16, split_k=2, weights="descriptor"
    ),
    # stream-K: 3 (m 5) or 6 (m 17) tiles x 5 K-iterations over 7 programs, tiles split
    "stream-k": SkinnyConfig(block_m=16, block_n=16, block_k=16, programs=7),
    "stream-k-no-swap": SkinnyConfig(block_m=16, block_n=32, block_k=32, swap_ab=False, programs=4),
    "stream-k-descriptor": SkinnyConfig(
        block_m=16, block_n=16, block_k=32, programs=5, weights="descriptor"
    ),
}


def operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=generator).to(dtype).to(DEVICE)
    return x, weight, bias


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m", [5, 17])
def test_fp32_matches_torch(name, m):
    config = CONFIGS[name]
    if config.weights == "descriptor" and sg.TensorDescriptor is None:
        pytest.skip("this triton has no TMA descriptors")
    x, weight, bias = operands(m, 40, 72, torch.float32)
    for b in (None, bias):
        out = skinny_gemm(x, weight, b, config)
        assert out.dtype == torch.float32 and out.shape == (m, 40)
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swap", "partials", "atomic", "descriptor-partials"])
def test_bf16_within_tolerance(name):
    config = CONFIGS[name]
    if config.weights == "descriptor" and sg.TensorDescriptor is None:
        pytest.skip("this triton has no TMA descriptors")
    x, weight, bias = operands(9, 48, 80, torch.bfloat16, seed=1)
    out = skinny_gemm(x, weight, bias, config)
    assert out.dtype == torch.bfloat16
    exact = x.float() @ weight.float().T + bias.float()
    # fp32 accumulation, one rounding to bf16 (the interpreter truncates): ~2 ulp of bf16
    torch.testing.assert_close(out.float(), exact, rtol=1.6e-2, atol=1.6e-2)


def test_split_ranges_cover_k_once():
    config = SkinnyConfig(block_k=32, split_k=3)
    assert sg.k_per_split(200, config) == 96  # 7 tiles of 32 in 3 splits: 3 tiles each
    assert sg.k_per_split(64, config) == 32  # more splits than tiles: one tile each
    assert sg.k_per_split(64, SkinnyConfig(block_k=32)) == 64


def test_deterministic_mode_sums_splits_in_a_fixed_order():
    atomic = CONFIGS["atomic"]
    # process-wide: a deterministic engine earlier in this process (the GPU tests) set it
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert sg.reduction_of(atomic) == "atomic"
        torch.use_deterministic_algorithms(True)
        assert sg.reduction_of(atomic) == "partials"
        x, weight, bias = operands(5, 40, 72, torch.float32)
        first = skinny_gemm(x, weight, bias, atomic)
        assert torch.equal(first, skinny_gemm(x, weight, bias, atomic))
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)
    assert sg.reduction_of(CONFIGS["partials"]) == "partials"


def test_empty_operands():
    config = CONFIGS["swap"]
    x, weight, bias = operands(3, 8, 16, torch.float32)
    assert skinny_gemm(x[:0], weight, None, config).shape == (0, 8)
    empty_k = skinny_gemm(x[:, :0], weight[:, :0], bias, config)
    assert torch.equal(empty_k, bias.expand(3, 8))


def test_bad_operands_are_named():
    config = CONFIGS["swap"]
    x, weight, _ = operands(3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="x \\[M, K\\] and weight \\[N, K\\]"):
        skinny_gemm(x, weight[:, :8], None, config)
    with pytest.raises(ValueError, match="one dtype"):
        skinny_gemm(x, weight.to(torch.bfloat16), None, config)
    with pytest.raises(ValueError, match="contiguous in their last"):
        skinny_gemm(x.t().contiguous().t(), weight, None, config)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 24"):
        SkinnyConfig(block_n=24)
    with pytest.raises(ValueError, match="reduction must be one of"):
        SkinnyConfig(reduction="tree")
    with pytest.raises(ValueError, match="split_k must be an integer >= 1"):
        SkinnyConfig(split_k=0)
    with pytest.raises(ValueError, match="unknown SkinnyConfig fields \\['bogus'\\]"):
        SkinnyConfig.from_dict({"bogus": 1})
    config = SkinnyConfig(block_n=128, split_k=4, reduction="atomic", weights="descriptor")
    assert SkinnyConfig.from_dict(config.as_dict()) == config


def test_heuristic_covers_decode_and_refuses_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv(sg.TABLE_ENV, str(tmp_path / "no-table.json"))
    # decode shapes: all of M in one program, split-K only where N gives too few programs
    qkv = skinny_config(64, 3072, 2048, torch.bfloat16)
    assert qkv is not None and qkv.block_m == 64 and qkv.split_k > 1
    head = skinny_config(24, 128256, 2048, torch.bfloat16)
    assert head is not None and head.block_m == 32 and head.split_k == 1
    assert skinny_config(1, 16, 16, torch.float32).block_m == 16
    assert skinny_config(65, 3072, 2048, torch.bfloat16) is None  # prefill: cuBLAS
    assert skinny_config(8, 3072, 2048, torch.float64) is None
    assert skinny_config(8, 3072, 8, torch.bfloat16) is None


def test_table_entries_win_over_the_heuristic(tmp_path, monkeypatch):
    measured = SkinnyConfig(block_m=16, block_n=128, block_k=256, split_k=2, num_stages=5)
    table = {
        "device": "test",
        "entries": [
            {"dtype": "bfloat16", "m": 16, "n": 3072, "k": 2048, "config": measured.as_dict()},
            {"dtype": "bfloat16", "m": 32, "n": 3072, "k": 2048, "config": None},  # cuBLAS won
        ],
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(sg.TABLE_ENV, str(path))
    assert skinny_config(8, 3072, 2048, torch.bfloat16) == measured  # padded up to m=16
    assert skinny_config(16, 3072, 2048, torch.bfloat16) == measured
    assert skinny_config(24, 3072, 2048, torch.bfloat16) is None
    assert skinny_config(64, 3072, 2048, torch.bfloat16) is None  # beyond what was measured
    # a shape the table does not hold still gets the heuristic, unless measured_only
    assert skinny_config(16, 2048, 2048, torch.bfloat16) == sg.heuristic_config(
        16, 2048, 2048, torch.bfloat16
    )
    assert skinny_config(16, 2048, 2048, torch.bfloat16, measured_only=True) is None
    assert skinny_config(8, 3072, 2048, torch.bfloat16, measured_only=True) == measured
    assert sg.table_device(str(path)) == "test"


def test_torch_layer_ops_linear_is_f_linear():
    x, weight, bias = operands(4, 24, 32, torch.float32)
    assert torch.equal(TorchLayerOps().linear(x, weight, bias), F.linear(x, weight, bias))


def test_triton_linear_uses_the_kernel_for_decode_shapes(monkeypatch):
    calls = []
    kernel = sg.skinny_gemm
    monkeypatch.setattr(sg, "skinny_gemm", lambda *args: calls.append(args[3]) or kernel(*args))
    ops = TritonLayerOps(skinny_gemm=True)
    x, weight, bias = operands(6, 40, 72, torch.float32)
    torch.testing.assert_close(ops.linear(x, weight, bias), F.linear(x, weight, bias))
    torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight))
    assert calls == [skinny_config(6, 40, 72, torch.float32)] * 2
    # more rows than a decode batch (prefill), or the switch off: F.linear itself
    many = torch.randn(sg.MAX_M + 1, 72, device=DEVICE)
    assert torch.equal(ops.linear(many, weight, bias), F.linear(many, weight, bias))
    assert torch.equal(TritonLayerOps().linear(x, weight, bias), F.linear(x, weight, bias))
    assert len(calls) == 2


def test_switch_is_read_where_the_layer_ops_are_built(monkeypatch):
    monkeypatch.setenv("PPRUNTIME_SKINNY_GEMM", "0")
    assert repr(select_layer_ops("triton", DEVICE)) == "TritonLayerOps(skinny_gemm=False)"
    monkeypatch.setenv("PPRUNTIME_SKINNY_GEMM", "1")
    assert repr(select_layer_ops("triton", DEVICE)) == "TritonLayerOps(skinny_gemm=True)"
    fused_said = ", SiLU-and-mul fused into the down projection where the table says"
    for fused, said in ((False, ""), (True, fused_said)):  # whatever the committed table holds
        monkeypatch.setattr(sg, "has_silu_mul_launches", lambda fused=fused: fused)
        assert (
            select_layer_ops("triton", DEVICE).describe()
            == f"triton (skinny GEMM on for every decode shape{said})"
        )
    assert select_layer_ops("torch", DEVICE).name == "torch"  # the reference stays F.linear
    monkeypatch.setenv("PPRUNTIME_SKINNY_GEMM", "maybe")
    for name in ("triton", "torch"):
        with pytest.raises(ConfigError, match="PPRUNTIME_SKINNY_GEMM='maybe' is not a boolean"):
            select_layer_ops(name, DEVICE)


def test_unset_switch_uses_the_table_only_on_the_device_it_was_measured_on(tmp_path, monkeypatch):
    from ppruntime.model import layer_ops

    sg.table_device()  # the default table's answer, as an earlier engine start-up reads it
    monkeypatch.delenv("PPRUNTIME_SKINNY_GEMM", raising=False)
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "GPU A", "entries": []}))
    monkeypatch.setenv(sg.TABLE_ENV, str(path))
    # not CUDA (the interpreted CPU runs): off
    assert repr(select_layer_ops("triton", DEVICE)) == "TritonLayerOps(skinny_gemm=False)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU A")
    cuda = torch.device("cuda", 0)
    assert layer_ops._skinny_table_fits(cuda)
    ops = layer_ops.TritonLayerOps(skinny_gemm=True, measured_only=True)
    assert ops.describe() == "triton (skinny GEMM on for the launch table's shapes)"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU B")
    assert not layer_ops._skinny_table_fits(cuda)  # another GPU: cuBLAS everywhere
    monkeypatch.setenv(sg.TABLE_ENV, str(tmp_path / "missing.json"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU A")
    assert not layer_ops._skinny_table_fits(cuda)  # no table: nothing was measured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["swap", "partials", "atomic", "descriptor-partials", "stream-k"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "silu_mul"])
def test_replays_from_a_cuda_graph(name, fused):
    """Both split-K reductions (their zeroed / partial buffers included) and stream-K (its
    cached flags left zeroed by each launch) capture and replay, plain and with SiLU-and-mul
    fused in (nothing in either syncs with the host)."""
    config = CONFIGS[name]
    if fused:
        x, weight, bias = gate_up_operands(17, 40, 72, torch.bfloat16)
        launch = skinny_gemm_silu_mul
    else:
        x, weight, bias = operands(17, 40, 72, torch.bfloat16)
        launch = skinny_gemm
    launch(x, weight, bias, config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch(x, weight, bias, config)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    if fused:
        assert_close_to_torch(out, x, weight, bias)
    else:
        exact = x.float() @ weight.float().T + bias.float()
        torch.testing.assert_close(out.float(), exact, rtol=1.6e-2, atol=1.6e-2)


# --- stream-K (SkinnyConfig.programs) ----------------------------------------------------------


def holders_per_tile(tiles: int, k_iters: int, programs: int) -> list[list[int]]:
    """Per tile, the programs holding a segment of it (stream_k_segments' schedule)."""
    holders = [[] for _ in range(tiles)]
    for program, segments in enumerate(sg.stream_k_segments(tiles, k_iters, programs)):
        for tile, _, _ in segments:
            holders[tile].append(program)
    return holders


def test_stream_k_schedule_covers_each_iteration_once_and_waits_only_downwards():
    for tiles, k_iters, programs in [(3, 5, 4), (3, 5, 7), (96, 32, 132), (64, 32, 264), (2, 3, 6)]:
        schedule = sg.stream_k_segments(tiles, k_iters, programs)
        covered = sorted(
            (tile, k)
            for segments in schedule
            for tile, first, end in segments
            for k in range(first, end)
        )
        assert covered == [(tile, k) for tile in range(tiles) for k in range(k_iters)]
        shares = [sum(end - first for _, first, end in segments) for segments in schedule]
        assert max(shares) - min(shares) <= 1 and shares == sorted(shares, reverse=True)
        for segments in schedule:
            # only the segment walked first may stop short of its tile's end (one slot each)
            assert all(end == k_iters for _, _, end in segments[1:])
            assert [tile for tile, _, _ in segments] == sorted(
                {tile for tile, _, _ in segments}, reverse=True
            )
        for holders in holders_per_tile(tiles, k_iters, programs):
            # the holder of the tile's end, which waits for the others, is the highest
            assert holders == sorted(holders) and holders == list(
                range(holders[0], holders[-1] + 1)
            )
    # the 8B qkv launch at BLOCK_N 64: 96 tiles x 32 K-iterations on 132 programs
    assert max(len(h) for h in holders_per_tile(96, 32, 132)) == 3


# (m, n, k, config, the most programs one tile is split across in that launch)
STREAM_K_CASES = {
    # 15 iterations over 4 programs (4, 4, 4, 3): no tile whole in one program
    "p-not-dividing": (5, 40, 72, SkinnyConfig(block_m=16, block_n=16, block_k=16, programs=4), 2),
    # 3 tiles on 7 programs: tile 1 in programs 2, 3 and 4; M 1
    "three-programs-a-tile": (
        1,
        40,
        72,
        SkinnyConfig(block_m=16, block_n=16, block_k=16, programs=7),
        3,
    ),
    # more programs than iterations: the grid is cut to 15, each tile split 5 ways
    "more-programs-than-iterations": (
        5,
        40,
        72,
        SkinnyConfig(block_m=16, block_n=16, block_k=16, programs=100),
        5,
    ),
    "no-swap-m1": (
        1,
        40,
        72,
        SkinnyConfig(block_m=16, block_n=16, block_k=32, swap_ab=False, programs=4),
        2,
    ),
    "m64": (64, 40, 72, SkinnyConfig(block_m=64, block_n=32, block_k=32, programs=5), 3),
    "m64-no-swap": (
        64,
        40,
        72,
        SkinnyConfig(block_m=64, block_n=32, block_k=32, swap_ab=False, programs=5),
        3,
    ),
}


@pytest.mark.parametrize("name", list(STREAM_K_CASES))
def test_stream_k_matches_torch(name):
    """Tiles split unevenly across programs, N and K that the blocks do not fill: fp32
    (IEEE dots) to fp32 rounding, bf16 within its tolerance, with and without bias."""
    m, n, k, config, most_holders = STREAM_K_CASES[name]
    tiles = -(-n // config.block_n) * -(-m // config.block_m)
    k_iters = -(-k // config.block_k)
    programs = min(config.programs, tiles * k_iters)
    assert max(len(h) for h in holders_per_tile(tiles, k_iters, programs)) == most_holders
    x, weight, bias = operands(m, n, k, torch.float32)
    for b in (None, bias):
        out = skinny_gemm(x, weight, b, config)
        torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x, weight, bias = operands(m, n, k, torch.bfloat16, seed=1)
    out = skinny_gemm(x, weight, bias, config)
    assert out.dtype == torch.bfloat16
    exact = x.float() @ weight.float().T + bias.float()
    torch.testing.assert_close(out.float(), exact, rtol=1.6e-2, atol=1.6e-2)


def test_stream_k_launches_leave_the_flags_zeroed():
    """The flags are zeroed once per device and program count and never again (the
    workspace is cached too): each launch resets what it set, so the next launch (any
    shape) gives the same bits."""
    config = STREAM_K_CASES["three-programs-a-tile"][3]
    x, weight, bias = operands(5, 40, 72, torch.float32)
    first = skinny_gemm(x, weight, bias, config)
    flags = sg.stream_k_flags(x.device, config.programs)
    assert flags.shape == (7,) and not flags.any()
    slot = config.block_n * config.block_m
    partials = sg.stream_k_partials(x.device, config.programs, slot)
    assert partials.shape == (7, slot)
    other_x, other_weight, _ = operands(3, 24, 40, torch.float32, seed=2)
    other = skinny_gemm(other_x, other_weight, None, config)  # another shape, same flags
    torch.testing.assert_close(other, F.linear(other_x, other_weight), rtol=1e-5, atol=1e-5)
    assert sg.stream_k_flags(x.device, config.programs) is flags and not flags.any()
    assert sg.stream_k_partials(x.device, config.programs, slot) is partials  # no allocation
    assert torch.equal(skinny_gemm(x, weight, bias, config), first)


def test_stream_k_buffers_are_not_first_made_inside_a_graph_capture(monkeypatch):
    """Made inside a capture, the zeroed flags would come from the graph's pool with a
    memset in the graph: refused, naming the fix (a warm-up launch first)."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run the launch once before capturing it"):
        sg.stream_k_flags(torch.device("cuda", 0), 4093)
    with pytest.raises(RuntimeError, match="partials for programs=4093"):
        sg.stream_k_partials(torch.device("cuda", 0), 4093, 256)


def test_stream_k_config_is_validated_and_round_trips_through_the_table(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="programs must be an integer from 0 .* got -1"):
        SkinnyConfig(programs=-1)
    with pytest.raises(ValueError, match="programs must be an integer .* got 1.5"):
        SkinnyConfig(programs=1.5)
    with pytest.raises(
        ValueError, match="programs=132 \\(stream-K\\) splits K itself: set split_k"
    ):
        SkinnyConfig(programs=132, split_k=2)
    config = SkinnyConfig(block_n=64, block_k=128, programs=264, weights="descriptor")
    assert SkinnyConfig.from_dict(config.as_dict()) == config
    assert config.describe().endswith(" streamk264")
    assert SkinnyConfig.from_dict({"block_n": 64}).programs == 0  # older tables: tiles
    table = tmp_path / "table.json"
    entry = {"dtype": "bfloat16", "m": 64, "n": 6144, "k": 4096, "config": config.as_dict()}
    table.write_text(json.dumps({"device": "GPU A", "entries": [entry]}))
    monkeypatch.setenv(sg.TABLE_ENV, str(table))
    assert skinny_config(64, 6144, 4096, torch.bfloat16) == config


# --- SiLU-and-multiply fused into the down projection ------------------------------------------

# the down projections of the bench's 1B and 8B shapes (scripts/_bench_models.SHAPES):
# weight [hidden, intermediate]
PRESET_DOWN_SHAPES = {"1b": (2048, 8192), "8b": (4096, 14336)}
# interpreted, a full-size launch takes seconds: the presets' K (what the split-K ranges and
# the up offset depend on) with N cut to a few programs' rows, and a few batches; on CUDA
# the whole weight and every batch 1..64
PRESET_ROWS = {"cuda": None, "cpu": 64}
PRESET_BATCHES = {"cuda": list(range(1, 65)), "cpu": [3, 64]}
PRESET_CONFIGS = {
    # small enough for an H200's shared memory with the fused A tiles (gate and up)
    "swap-split2": SkinnyConfig(block_m=64, block_n=64, block_k=128, split_k=2),
    "no-swap-split4-atomic": SkinnyConfig(
        block_m=64,
        block_n=128,
        block_k=64,
        split_k=4,
        reduction="atomic",
        swap_ab=False,
        num_stages=2,
    ),
}


def gate_up_operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """gate_up [m, 2k] (gate first), weight [n, k], bias [n]."""
    generator = torch.Generator().manual_seed(seed)
    gate_up = (2.0 * torch.randn(m, 2 * k, generator=generator)).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=generator).to(dtype).to(DEVICE)
    return gate_up, weight, bias


def torch_silu_mul_linear(gate_up, weight, bias=None):
    """The reference: today's two calls of TorchLayerOps (torch's silu rounding)."""
    reference = TorchLayerOps()
    return reference.linear(reference.silu_and_mul(gate_up), weight, bias)


def assert_matches_two_kernel_path(fused, gate_up, weight, bias, config):
    """The fused kernel's A operand is bitwise silu_and_mul's output (one shared helper),
    so interpreted the result is the two-kernel path's bit for bit. Compiled, the same
    operand may reach a differently scheduled MMA (from registers, not loaded), and atomic
    split-K sums in a varying order: there, one unit in the last place of a bf16 output (the
    same fp32 sum, rounded), fp32's usual tolerance for an fp32 one (sums in another order)."""
    unfused = skinny_gemm(activation.silu_and_mul(gate_up), weight, bias, config)
    if DEVICE == "cpu" and sg.INTERPRETED:
        assert torch.equal(fused, unfused)
    else:
        tolerance = 1e-5 if fused.dtype == torch.float32 else torch.finfo(fused.dtype).eps
        scale = unfused.float().abs().max().item()
        torch.testing.assert_close(
            fused.float(), unfused.float(), rtol=tolerance, atol=tolerance * scale
        )


def assert_close_to_torch(fused, gate_up, weight, bias):
    expected = torch_silu_mul_linear(gate_up, weight, bias)
    assert fused.dtype == expected.dtype and fused.shape == expected.shape
    if fused.dtype == torch.float32:
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    else:  # both round the activation to bf16; the GEMM then differs by ~2 ulp of bf16
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(fused.float(), expected.float(), rtol=1.6e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_silu_mul_matches_the_two_kernel_path(name, dtype):
    """Every switch of the kernel (CONFIGS), with and without bias, two M tiles, K (72)
    neither BLOCK_K fills, against skinny_gemm(silu_and_mul(gate_up)) and torch."""
    config = CONFIGS[name]
    if config.weights == "descriptor" and sg.TensorDescriptor is None:
        pytest.skip("this triton has no TMA descriptors")
    gate_up, weight, bias = gate_up_operands(17, 40, 72, dtype)
    for b in (None, bias):
        fused = skinny_gemm_silu_mul(gate_up, weight, b, config)
        assert fused.dtype == dtype and fused.shape == (17, 40)
        assert_matches_two_kernel_path(fused, gate_up, weight, b, config)
        assert_close_to_torch(fused, gate_up, weight, b)


if DEVICE == "cuda":
    PRESET_CASES = [(preset, name) for preset in PRESET_DOWN_SHAPES for name in PRESET_CONFIGS]
else:  # interpreted: each preset with one of the configs
    PRESET_CASES = list(zip(PRESET_DOWN_SHAPES, PRESET_CONFIGS))


@pytest.mark.parametrize(("preset", "name"), PRESET_CASES)
def test_fused_silu_mul_on_the_presets_down_shapes(preset, name):
    """bf16 at the 1B / 8B down projection's K (and N on CUDA), decode batches up to 64."""
    config = PRESET_CONFIGS[name]
    n, k = PRESET_DOWN_SHAPES[preset]
    n = PRESET_ROWS[DEVICE] or n
    largest = max(PRESET_BATCHES[DEVICE])
    gate_up, weight, _ = gate_up_operands(largest, n, k, torch.bfloat16, seed=2)
    for m in PRESET_BATCHES[DEVICE]:
        rows = gate_up[:m]  # a view: rows 2k apart, as the gate_up projection writes them
        fused = skinny_gemm_silu_mul(rows, weight, None, config)
        assert_matches_two_kernel_path(fused, rows, weight, None, config)
        assert_close_to_torch(fused, rows, weight, None)


def test_fused_silu_mul_reads_gate_up_with_a_row_stride():
    """gate_up as a column slice of a wider buffer (rows further apart than 2K)."""
    wide, weight, bias = gate_up_operands(6, 24, 80, torch.float32, seed=3)
    gate_up = wide[:, :80]  # K = 40: gate 0..39, up 40..79 of each row 160 apart
    assert gate_up.stride(0) == 160
    weight = weight[:, :40].contiguous()
    fused = skinny_gemm_silu_mul(gate_up, weight, bias[:24], CONFIGS["partials"])
    assert_close_to_torch(fused, gate_up, weight, bias[:24])


def test_fused_silu_mul_bad_operands_are_named():
    config = CONFIGS["swap"]
    gate_up, weight, _ = gate_up_operands(3, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="gate_up \\[M, 2K\\] and weight \\[N, K\\]"):
        skinny_gemm_silu_mul(gate_up[:, :16], weight, None, config)  # [M, K]: no up half
    with pytest.raises(ValueError, match="skinny_gemm_silu_mul needs one dtype"):
        skinny_gemm_silu_mul(gate_up, weight.to(torch.bfloat16), None, config)
    assert skinny_gemm_silu_mul(gate_up[:0], weight, None, config).shape == (0, 8)


def fused_table(tmp_path, monkeypatch, entries: list[dict], device: str = "test") -> None:
    """A launch table of `entries` in a new file (the module caches each path's table)."""
    path = tmp_path / f"table{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({"device": device, "entries": entries}))
    monkeypatch.setenv(sg.TABLE_ENV, str(path))


FUSED = SkinnyConfig(block_m=16, block_n=16, block_k=32, split_k=2)


def fused_entry(m: int, n: int, k: int, config: SkinnyConfig | None) -> dict:
    return {
        "op": "silu_mul_linear",
        "dtype": "float32",
        "m": m,
        "n": n,
        "k": k,
        "config": config.as_dict() if config else None,
    }


def test_fused_entries_are_their_own_table_rows(tmp_path, monkeypatch):
    """A "silu_mul_linear" entry gives the fused launch for its down shape and not the
    plain GEMM's; shapes without one (or with a null one, or beyond the largest measured
    batch) get no fused launch, whatever the plain GEMM's rows say."""
    plain = SkinnyConfig(block_m=16, block_n=64, block_k=64)
    plain_entry = {"dtype": "float32", "m": 16, "n": 40, "k": 72, "config": plain.as_dict()}
    cublas_won = {"op": "linear", "dtype": "float32", "m": 32, "n": 40, "k": 72, "config": None}
    fused_table(
        tmp_path,
        monkeypatch,
        [plain_entry, cublas_won, fused_entry(16, 40, 72, FUSED), fused_entry(32, 40, 72, None)],
    )
    assert silu_mul_config(5, 40, 72, torch.float32) == FUSED  # padded up to m=16
    assert silu_mul_config(16, 40, 72, torch.float32) == FUSED
    assert silu_mul_config(17, 40, 72, torch.float32) is None  # the two kernels won at 32
    assert silu_mul_config(64, 40, 72, torch.float32) is None  # beyond what was measured
    assert silu_mul_config(5, 40, 72, torch.bfloat16) is None  # another dtype: absent
    assert silu_mul_config(5, 24, 72, torch.float32) is None  # no heuristic for fused
    assert skinny_config(5, 40, 72, torch.float32) == plain  # the plain rows are apart
    assert skinny_config(17, 40, 72, torch.float32) is None
    assert sg.has_silu_mul_launches()
    fused_table(tmp_path, monkeypatch, [plain_entry])
    assert silu_mul_config(5, 40, 72, torch.float32) is None  # absent: the two kernels
    assert not sg.has_silu_mul_launches()


def test_an_unknown_table_op_is_named(tmp_path, monkeypatch):
    fused_table(tmp_path, monkeypatch, [{**fused_entry(16, 8, 16, None), "op": "gelu"}])
    with pytest.raises(ValueError, match="an entry's op must be one of .* got 'gelu'"):
        silu_mul_config(5, 8, 16, torch.float32)


def test_torch_silu_mul_linear_is_the_two_calls():
    gate_up, weight, bias = gate_up_operands(4, 24, 32, torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.linear(F.silu(gate) * up, weight, bias)
    assert torch.equal(TorchLayerOps().silu_mul_linear(gate_up, weight, bias), expected)


def count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(args) or original(*args))
    return calls


@pytest.mark.parametrize("measured_only", [True, False])
def test_triton_silu_mul_linear_fuses_where_the_table_says(tmp_path, monkeypatch, measured_only):
    fused_table(tmp_path, monkeypatch, [fused_entry(16, 40, 72, FUSED)])
    fused_calls = count_calls(monkeypatch, sg, "skinny_gemm_silu_mul")
    activation_calls = count_calls(monkeypatch, activation, "silu_and_mul")
    ops = TritonLayerOps(skinny_gemm=True, measured_only=measured_only)
    gate_up, weight, bias = gate_up_operands(6, 40, 72, torch.float32)
    out = ops.silu_mul_linear(gate_up, weight, bias)
    assert [call[3] for call in fused_calls] == [FUSED] and not activation_calls
    assert torch.equal(out, skinny_gemm_silu_mul(gate_up, weight, bias, FUSED))
    torch.testing.assert_close(out, torch_silu_mul_linear(gate_up, weight, bias))
    fused_calls.clear()
    # silu_and_mul, then `linear` (the plain skinny GEMM's launch or cuBLAS), for a shape
    # without a fused entry, more rows than the entry's batch, or the skinny GEMM off
    cases = [
        (ops, gate_up, weight[:24]),
        (ops, torch.cat([gate_up] * 3), weight),
        (TritonLayerOps(), gate_up, weight),
    ]
    for layer_ops, rows, w in cases:
        out = layer_ops.silu_mul_linear(rows, w)
        assert torch.equal(out, layer_ops.linear(activation.silu_and_mul(rows), w))
    assert not fused_calls and len(activation_calls) == 2 * len(cases)


def test_describe_names_the_fused_launches(tmp_path, monkeypatch):
    fused_table(tmp_path, monkeypatch, [fused_entry(16, 40, 72, FUSED)])
    assert TritonLayerOps(skinny_gemm=True, measured_only=True).describe() == (
        "triton (skinny GEMM on for the launch table's shapes, SiLU-and-mul fused into the "
        "down projection where the table says)"
    )
    assert TritonLayerOps().describe() == "triton"
