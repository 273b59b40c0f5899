"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with M a decode batch.

At decode the projections are memory-bound: M <= 64 rows against weights of megabytes,
so the time is the time to stream W once. One program covers all of M (BLOCK_M >= M)
and a [BLOCK_N, K-range] slab of W (BLOCK_N whole rows of the nn.Linear layout, each
contiguous in K), so every weight byte is read exactly once. When N / BLOCK_N gives too
few programs to fill the GPU, split-K cuts K into SPLIT_K ranges; their fp32 partial sums
are either stored as [SPLIT_K, M, N] and summed by a small reduce-and-cast kernel
("partials"), or atomically added into a zeroed fp32 [M, N] buffer that the same small
kernel casts ("atomic"). Both are CUDA-graph capturable (no host sync, no data-dependent
shapes). SWAP_AB computes the tile as W @ x^T ([BLOCK_N, BLOCK_M]) so that the wide
dimension is the MMA's M (Hopper's wgmma needs 64 rows there); W is read by plain loads
or through a TMA tensor descriptor ("descriptor", sm_90+; zero-filled past N and K).
`skinny_gemm_silu_mul` is the MLP's down projection with SiLU-and-multiply fused in: x is
the [M, 2K] gate_up tensor and each A tile is silu(gate) * up, computed as it is loaded
(SILU_MUL), which saves the activation kernel's launch and its [M, K] round trip.

Stream-K (SkinnyConfig.programs = P > 0; 0, the default, is the schedule above): N / BLOCK_N
tiles on 132 SMs leave the last wave part-empty (8B qkv: 96 tiles; o: 64), and split-K only
moves that and adds the reduce's launch. Instead a persistent grid of P programs (1 or 2 per
SM) shares the iteration space tiles x K-iterations (BLOCK_K columns each) equally, each
program a contiguous run of it (the first total % P one iteration more), so every SM streams
the same number of weight bytes. A tile held whole by one program is stored as above. A tile
split across programs is fixed up in the kernel: the holders of its first iterations (lower
program ids) write their fp32 partial to their slot of a [P, BLOCK_N * BLOCK_M] workspace and
release their flag; the holder of its last iterations waits for each flag (acquire), resets
it to 0 and adds the partials in ascending program order, a fixed sum order (deterministic,
no atomics on the data). Each program walks its share from its end back to its start, so the
partial it leaves is its first piece of work and the wait is its last. Waits are only ever
for lower ids: the interpreter runs programs in id order, and a GPU dispatches a grid's
programs in id order, so a waiting program's lower ids are running or done (the grid need
not fit on the SMs at once; nothing else checks that it does, and CUDA does not promise the
order: CUB's decoupled look-back relies on it the same way). The int32 [P] flags are zeroed once per
device and P and cached (`stream_k_flags`), the workspace too (`stream_k_partials`); every
launch leaves the flags 0, so no launch needs a memset or an allocation and it captures into
a CUDA graph (run it once before the first capture). Launches sharing them must be
stream-ordered, as a decode step's kernels are.

`skinny_config(m, n, k, dtype)` picks the launch: the measured table
(skinny_gemm_table.json beside this file, or $PPRUNTIME_SKINNY_GEMM_TABLE; written by
scripts/sweep_decode_gemm.py --out) for shapes it holds, a heuristic for others; None
means "use torch / cuBLAS". `silu_mul_config` is the fused launch's, from the table's
"silu_mul_linear" entries only; None means "silu_and_mul, then the GEMM".
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import triton
import triton.language as tl

from ppruntime.kernels.activation import silu_mul
from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no TMA descriptors (weights="descriptor" is refused)
    TensorDescriptor = None

REDUCTIONS = ("partials", "atomic")
LINEAR, SILU_MUL_LINEAR = "linear", "silu_mul_linear"
OPS = (LINEAR, SILU_MUL_LINEAR)  # what a table entry launches: the GEMM, or SiLU fused in
WEIGHT_SOURCES = ("pointer", "descriptor")
MAX_M = 128  # the most rows a launch is meant for (one program column covers them)
HEURISTIC_MAX_M = 64
MAX_STREAM_K_PROGRAMS = 4096  # a bound on SkinnyConfig.programs (a few per SM is the use)
TARGET_PROGRAMS = 2 * 132  # two programs per SM of an H100 / H200
TABLE_ENV = "PPRUNTIME_SKINNY_GEMM_TABLE"
DEFAULT_TABLE = Path(__file__).with_name("skinny_gemm_table.json")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class SkinnyConfig:
    """One launch of the skinny GEMM (the fields are the kernel's tiles and switches)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    reduction: str = "partials"  # how split-K partial sums meet (unused at split_k 1)
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = True
    weights: str = "pointer"
    # 0: one program per tile (and split), as above; P > 0: stream-K, a persistent grid of
    # P programs sharing tiles x K-iterations equally (split tiles fixed up in-kernel)
    programs: int = 0

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not _power_of_two(value):
                raise ValueError(f"SkinnyConfig.{name} must be a power of two >= 16, got {value!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"SkinnyConfig.split_k must be an integer >= 1, got {self.split_k!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"SkinnyConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if self.weights not in WEIGHT_SOURCES:
            raise ValueError(
                f"SkinnyConfig.weights must be one of {WEIGHT_SOURCES}, got {self.weights!r}"
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(
                f"SkinnyConfig.num_warps must be 1, 2, 4, 8 or 16, not {self.num_warps!r}"
            )
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"SkinnyConfig.num_stages must be >= 1, got {self.num_stages!r}")
        if (
            not isinstance(self.programs, int)
            or isinstance(self.programs, bool)
            or not 0 <= self.programs <= MAX_STREAM_K_PROGRAMS
        ):
            raise ValueError(
                f"SkinnyConfig.programs must be an integer from 0 (one program per tile) to "
                f"{MAX_STREAM_K_PROGRAMS} (stream-K's persistent programs), got {self.programs!r}"
            )
        if self.programs and self.split_k != 1:
            raise ValueError(
                f"SkinnyConfig.programs={self.programs} (stream-K) splits K itself: set "
                f"split_k to 1, got split_k={self.split_k}"
            )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> SkinnyConfig:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SkinnyConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def describe(self) -> str:
        split = f" split{self.split_k}-{self.reduction}" if self.split_k > 1 else ""
        stream_k = f" streamk{self.programs}" if self.programs else ""
        return (
            f"m{self.block_m} n{self.block_n} k{self.block_k} w{self.num_warps} "
            f"s{self.num_stages}{' swap' if self.swap_ab else ''} {self.weights}{split}"
            f"{stream_k}"
        )


@triton.jit
def _accumulate(
    acc,  # fp32 [BLOCK_N, BLOCK_M] (SWAP_AB) or [BLOCK_M, BLOCK_N]
    x_rows,  # [BLOCK_M, 1] pointers to the rows of x (SILU_MUL: of gate_up)
    w_ptr,
    w_row_offsets,  # [BLOCK_N, 1] element offsets of the rows of W (unused with W_DESCRIPTOR)
    w_first_row,  # the tile's first row of W (the descriptor's coordinate)
    k_start,  # a multiple of BLOCK_K
    k_end,  # a multiple of BLOCK_K, or K
    m_valid,
    n_valid,
    up_offset,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    W_DESCRIPTOR: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SILU_MUL: tl.constexpr,
):
    """acc + the tile's product over the K columns [k_start, k_end)."""
    cols = tl.arange(0, BLOCK_K)
    for k in range(k_start, k_end, BLOCK_K):
        k_cols = k + cols
        if EVEN_K:
            x_mask = m_valid[:, None]
        else:
            x_mask = m_valid[:, None] & (k_cols < k_end)[None, :]
        x = tl.load(x_rows + k_cols[None, :], mask=x_mask, other=0.0)
        if SILU_MUL:  # x_ptr is gate_up: this tile's gate columns, its up columns up_offset on
            up = tl.load(x_rows + up_offset + k_cols[None, :], mask=x_mask, other=0.0)
            x = silu_mul(x, up)  # masked lanes: silu(0) * 0 = 0
        if W_DESCRIPTOR:
            # zeros past N and K; a box never crosses k_end inside K (k_start % BLOCK_K == 0)
            w = w_ptr.load([w_first_row, k])
        elif EVEN_N and EVEN_K:
            w = tl.load(w_ptr + w_row_offsets + k_cols[None, :], eviction_policy="evict_first")
        elif EVEN_K:
            w = tl.load(
                w_ptr + w_row_offsets + k_cols[None, :],
                mask=n_valid[:, None],
                other=0.0,
                eviction_policy="evict_first",
            )
        else:
            w = tl.load(
                w_ptr + w_row_offsets + k_cols[None, :],
                mask=n_valid[:, None] & (k_cols < k_end)[None, :],
                other=0.0,
                eviction_policy="evict_first",
            )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
    return acc


@triton.jit
def _tile_offsets(rows_m, rows_n, m_valid, n_valid, stride_om, SWAP_AB: tl.constexpr):
    """The output tile's element offsets in y [M, N] and its mask, in the layout of acc."""
    if SWAP_AB:
        offsets = rows_m[None, :].to(tl.int64) * stride_om + rows_n[:, None]
        valid = n_valid[:, None] & m_valid[None, :]
    else:
        offsets = rows_m[:, None].to(tl.int64) * stride_om + rows_n[None, :]
        valid = m_valid[:, None] & n_valid[None, :]
    return offsets, valid


@triton.jit
def _add_bias(acc, bias_ptr, rows_n, n_valid, SWAP_AB: tl.constexpr):
    bias = tl.load(bias_ptr + rows_n, mask=n_valid, other=0.0).to(tl.float32)
    if SWAP_AB:
        acc += bias[:, None]
    else:
        acc += bias[None, :]
    return acc


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], rows stride_xm apart; SILU_MUL: gate_up [M, 2K] ([gate | up])
    w_ptr,  # [N, K] rows stride_wn apart; W_DESCRIPTOR: its TMA descriptor ([BLOCK_N, BLOCK_K])
    bias_ptr,  # [N] (HAS_BIAS, applied here only when not SPLIT)
    out_ptr,  # not SPLIT: y [M, N]; partials: fp32 [splits, M, N]; ATOMIC: zeroed fp32 [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_split,  # partials: elements between two splits' [M, N] planes
    k_per_split,  # a multiple of BLOCK_K; the grid's third dimension is the number of splits
    up_offset,  # SILU_MUL: elements from a gate column to its up column (K); else unused
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,  # more than one K range: fp32 partial sums, reduced by another kernel
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr,
    W_DESCRIPTOR: tl.constexpr,
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0: no row mask on W
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no column masks
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" for fp32, else "tf32" (unused)
    UPCAST: tl.constexpr,  # fp32 operands for the dot (the interpreter's bf16 dot is wrong)
    SILU_MUL: tl.constexpr,  # the A operand is silu(gate) * up, computed as it is loaded
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = rows_m < M
    n_valid = rows_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm
    w_row_offsets = rows_n.to(tl.int64)[:, None] * stride_wn  # unused with W_DESCRIPTOR
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(
        acc,
        x_rows,
        w_ptr,
        w_row_offsets,
        pid_n * BLOCK_N,
        k_start,
        k_end,
        m_valid,
        n_valid,
        up_offset,
        BLOCK_K,
        SWAP_AB,
        W_DESCRIPTOR,
        EVEN_N,
        EVEN_K,
        PRECISION,
        UPCAST,
        SILU_MUL,
    )
    offsets, valid = _tile_offsets(rows_m, rows_n, m_valid, n_valid, stride_om, SWAP_AB)
    if not SPLIT:
        if HAS_BIAS:
            acc = _add_bias(acc, bias_ptr, rows_n, n_valid, SWAP_AB)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=valid)
    elif ATOMIC:
        tl.atomic_add(out_ptr + offsets, acc, mask=valid, sem="relaxed")
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * stride_split + offsets, acc, mask=valid)


@triton.jit
def _owner(iteration, base, extra):
    """The program whose share of the iteration space holds `iteration`: the first `extra`
    programs hold base + 1 iterations each, the others base."""
    longer = extra * (base + 1)
    if iteration < longer:
        owner = iteration // (base + 1)
    else:
        owner = extra + (iteration - longer) // tl.maximum(base, 1)
    return owner


@triton.jit
def _stream_k_kernel(
    x_ptr,  # [M, K], rows stride_xm apart; SILU_MUL: gate_up [M, 2K] ([gate | up])
    w_ptr,  # [N, K] rows stride_wn apart; W_DESCRIPTOR: its TMA descriptor ([BLOCK_N, BLOCK_K])
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # y [M, N]
    partial_ptr,  # fp32 [programs, BLOCK_N * BLOCK_M]: one slot per program, acc's layout
    flag_ptr,  # int32 [programs], 0 between launches; 1: that program's slot is written
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    up_offset,  # SILU_MUL: elements from a gate column to its up column (K); else unused
    n_tiles,  # cdiv(N, BLOCK_N); tile t covers rows (t % n_tiles) and M block t // n_tiles
    k_iters,  # cdiv(K, BLOCK_K): one K-iteration is BLOCK_K columns of one tile
    total_iters,  # tiles x k_iters, shared out among the grid's programs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWAP_AB: tl.constexpr,
    W_DESCRIPTOR: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SILU_MUL: tl.constexpr,
    PDL: tl.constexpr,
):
    """Stream-K: program p holds the contiguous iterations [start, end) of the space tiles x
    K-iterations and walks the tile segments of its share from the LAST to the first. Its
    first segment walked (its share's end) may be a tile's beginning or middle: that fp32
    partial goes to slot p, then flag p is released. Every other segment reaches its
    tile's end: the program stores the tile (+ bias, cast), and where the segment does
    not start at the tile's beginning, the lower programs that hold the rest have each
    left their partial; it waits for each flag (acquire), resets it to 0 and adds the
    partials in ascending program order (a fixed sum order). Waits are only ever for lower
    programs, which made their partial first in their walk."""
    begin_dependent(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    base = total_iters // programs
    extra = total_iters % programs
    start = pid * base + tl.minimum(pid, extra)
    end = start + base + (pid < extra).to(tl.int32)
    slot = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    if not SWAP_AB:
        slot = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    segment_end = end
    while segment_end > start:
        tile = (segment_end - 1) // k_iters
        tile_start = tile * k_iters
        segment_start = tl.maximum(start, tile_start)
        tile_n = tile % n_tiles
        rows_m = (tile // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_valid = rows_m < M
        n_valid = rows_n < N
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate(
            acc,
            x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm,
            w_ptr,
            rows_n.to(tl.int64)[:, None] * stride_wn,
            tile_n * BLOCK_N,
            (segment_start - tile_start) * BLOCK_K,
            tl.minimum((segment_end - tile_start) * BLOCK_K, K),
            m_valid,
            n_valid,
            up_offset,
            BLOCK_K,
            SWAP_AB,
            W_DESCRIPTOR,
            EVEN_N,
            EVEN_K,
            PRECISION,
            UPCAST,
            SILU_MUL,
        )
        if segment_end < tile_start + k_iters:  # the tile's end is a higher program's
            tl.store(partial_ptr + pid.to(tl.int64) * (BLOCK_N * BLOCK_M) + slot, acc)
            tl.debug_barrier()  # every thread's part of the slot before the release
            tl.atomic_xchg(flag_ptr + pid, 1, sem="release")
        else:
            if segment_start > tile_start:  # lower programs hold the tile's first iterations
                fixup = tl.zeros_like(acc)
                for holder in range(_owner(tile_start, base, extra), pid):
                    # consume and reset in one: 1 -> 0 once that holder has released it
                    while tl.atomic_cas(flag_ptr + holder, 1, 0, sem="acquire") != 1:
                        pass
                    tl.debug_barrier()  # no thread reads the slot before the acquire
                    fixup += tl.load(
                        partial_ptr + tl.cast(holder, tl.int64) * (BLOCK_N * BLOCK_M) + slot,
                        cache_modifier=".cg",  # from L2, where the holder's stores are
                    )
                acc = fixup + acc
            if HAS_BIAS:
                acc = _add_bias(acc, bias_ptr, rows_n, n_valid, SWAP_AB)
            offsets, valid = _tile_offsets(rows_m, rows_n, m_valid, n_valid, stride_om, SWAP_AB)
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=valid)
        segment_end = segment_start


@triton.jit
def _reduce_splits_kernel(
    partial_ptr,  # fp32 [num_splits, M, N]
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    N,
    num_splits,
    stride_split,
    stride_pm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """out = sum over splits (+ bias), cast to out's dtype; one split is the cast alone."""
    begin_dependent(PDL)
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(num_splits):
        acc += tl.load(partial_ptr + split * stride_split + row * stride_pm + cols, mask=valid)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(out_ptr.dtype.element_ty), mask=valid)


REDUCE_BLOCK = 1024


def k_per_split(k: int, config: SkinnyConfig) -> int:
    """The K range of one split: ceil(K / split_k) rounded up to whole BLOCK_K tiles."""
    tiles = triton.cdiv(k, config.block_k)
    return triton.cdiv(tiles, min(config.split_k, tiles)) * config.block_k


def reduction_of(config: SkinnyConfig) -> str:
    """The split-K reduction a launch uses: the config's, except that atomics (whose sum
    order varies run to run) give way to partials under torch.use_deterministic_algorithms
    (which --deterministic sets on CUDA)."""
    if config.reduction == "atomic" and torch.are_deterministic_algorithms_enabled():
        return "partials"
    return config.reduction


def _weight_descriptor(weight: torch.Tensor, config: SkinnyConfig):
    if TensorDescriptor is None:
        raise ValueError(
            "weights='descriptor' needs triton.tools.tensor_descriptor (triton >= 3.4)"
        )
    if weight.data_ptr() % 16 or (weight.stride(0) * weight.element_size()) % 16:
        raise ValueError(
            f"weights='descriptor' needs the weight 16-byte aligned, its row stride too "
            f"(stride {weight.stride(0)} x {weight.element_size()} bytes)"
        )
    n, k = weight.shape
    return TensorDescriptor(weight, [n, k], [weight.stride(0), 1], [config.block_n, config.block_k])


def _check_operands(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    operand: str,
    columns_per_k: int,
) -> None:
    """x [M, columns_per_k * K] (called `operand` in the message) against weight [N, K]."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != columns_per_k * weight.shape[1]:
        raise ValueError(
            f"{name} needs {operand} and weight [N, K], got {list(x.shape)} and "
            f"{list(weight.shape)}"
        )
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"{name} needs one dtype, got x {x.dtype}, weight {weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else "")
        )
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{name} needs x and weight contiguous in their last (K) dimension")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.stride(0) != 1):
        raise ValueError(f"bias must be contiguous [{weight.shape[0]}], got {list(bias.shape)}")


def skinny_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyConfig
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N]), in x's dtype, fp32 accumulation."""
    _check_operands("skinny_gemm", x, weight, bias, "x [M, K]", 1)
    return _launch(x, weight, bias, config, silu_mul=False)


def skinny_gemm_silu_mul(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyConfig
) -> torch.Tensor:
    """y [M, N] = (silu(gate) * up) @ weight [N, K]^T (+ bias [N]) for gate_up [M, 2K] =
    [gate | up]: the MLP's activation fused into its down projection. The activation is
    computed as the A operand is loaded, rounded as kernels/activation.silu_and_mul rounds
    it, so the result is skinny_gemm(silu_and_mul(gate_up), weight, bias, config)'s."""
    _check_operands("skinny_gemm_silu_mul", gate_up, weight, bias, "gate_up [M, 2K]", 2)
    return _launch(gate_up, weight, bias, config, silu_mul=True)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: SkinnyConfig,
    silu_mul: bool,
) -> torch.Tensor:
    m = x.shape[0]
    n, k = weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    if config.programs:
        return _launch_stream_k(x, weight, bias, config, silu_mul, out)
    split_range = k_per_split(k, config)
    splits = triton.cdiv(k, split_range)
    atomic = splits > 1 and reduction_of(config) == "atomic"
    if splits == 1:
        target = out
    elif atomic:
        target = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    w_arg = _weight_descriptor(weight, config) if config.weights == "descriptor" else weight
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), splits)
    _skinny_gemm_kernel[grid](
        x,
        w_arg,
        bias if bias is not None else out,
        target,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        target.stride(-2),
        m * n,
        split_range,
        k if silu_mul else 0,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        SPLIT=splits > 1,
        ATOMIC=atomic,
        HAS_BIAS=bias is not None and splits == 1,
        SWAP_AB=config.swap_ab,
        W_DESCRIPTOR=config.weights == "descriptor",
        EVEN_N=n % config.block_n == 0,
        EVEN_K=k % config.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 or INTERPRETED else "tf32",
        UPCAST=INTERPRETED,
        SILU_MUL=silu_mul,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_options(x.device),
    )
    if splits > 1:
        _reduce_splits_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
            target,
            bias if bias is not None else out,
            out,
            n,
            1 if atomic else splits,
            m * n,
            n,
            out.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK=REDUCE_BLOCK,
            num_warps=4,
            **pdl_options(x.device),
        )
    return out


_stream_k_buffers: dict[tuple, torch.Tensor] = {}


def _cached_buffer(key: tuple, device: torch.device, make) -> torch.Tensor:
    buffer = _stream_k_buffers.get(key)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the skinny GEMM's stream-K buffers ({key[0]} for programs={key[2]} on "
                f"{device}) are made on the first launch outside a CUDA graph capture: run "
                "the launch once before capturing it (a warm-up)"
            )
        buffer = _stream_k_buffers[key] = make()
    return buffer


def stream_k_flags(device: torch.device, programs: int) -> torch.Tensor:
    """Stream-K's int32 [programs] flags on `device`: zeroed once here, then cached; each
    launch leaves them 0 again (the program that consumes a partial resets its flag), so
    no launch needs a memset and launches capture into CUDA graphs. One buffer per device
    and program count: the launches that share it must run one after another (one stream
    at a time, as the decode step's kernels do)."""
    return _cached_buffer(
        ("flags", str(device), programs),
        device,
        lambda: torch.zeros(programs, dtype=torch.int32, device=device),
    )


def stream_k_partials(device: torch.device, programs: int, slot: int) -> torch.Tensor:
    """Stream-K's fp32 [programs, slot] workspace (slot = BLOCK_N * BLOCK_M), cached as the
    flags are (no allocation per launch, the same one-stream rule); never needs clearing:
    a slot is read only after its flag says this launch wrote it."""
    return _cached_buffer(
        ("partials", str(device), programs, slot),
        device,
        lambda: torch.empty((programs, slot), dtype=torch.float32, device=device),
    )


def _launch_stream_k(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: SkinnyConfig,
    silu_mul: bool,
    out: torch.Tensor,
) -> torch.Tensor:
    """The stream-K schedule (config.programs > 0): min(programs, iterations) persistent
    programs over tiles x K-iterations; see _stream_k_kernel."""
    m = x.shape[0]
    n, k = weight.shape
    n_tiles = triton.cdiv(n, config.block_n)
    k_iters = triton.cdiv(k, config.block_k)
    total_iters = n_tiles * triton.cdiv(m, config.block_m) * k_iters
    programs = min(config.programs, total_iters)
    flags = stream_k_flags(x.device, config.programs)
    partials = stream_k_partials(x.device, config.programs, config.block_n * config.block_m)
    w_arg = _weight_descriptor(weight, config) if config.weights == "descriptor" else weight
    _stream_k_kernel[(programs,)](
        x,
        w_arg,
        bias if bias is not None else out,
        out,
        partials,
        flags,
        m,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        k if silu_mul else 0,
        n_tiles,
        k_iters,
        total_iters,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None,
        SWAP_AB=config.swap_ab,
        W_DESCRIPTOR=config.weights == "descriptor",
        EVEN_N=n % config.block_n == 0,
        EVEN_K=k % config.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 or INTERPRETED else "tf32",
        UPCAST=INTERPRETED,
        SILU_MUL=silu_mul,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_options(x.device),
    )
    return out


def stream_k_segments(tiles: int, k_iters: int, programs: int) -> list[list[tuple[int, int, int]]]:
    """The stream-K schedule `_stream_k_kernel` walks, in Python (for tests and reading):
    per program, its (tile, first K-iteration, end K-iteration) segments in the order it
    walks them (its share's last segment first). `programs` is the launched grid,
    min(config.programs, tiles * k_iters)."""
    total = tiles * k_iters
    base, extra = divmod(total, programs)
    schedule = []
    for program in range(programs):
        start = program * base + min(program, extra)
        end = start + base + (program < extra)
        segments = []
        while end > start:
            tile = (end - 1) // k_iters
            first = max(start, tile * k_iters)
            segments.append((tile, first - tile * k_iters, end - tile * k_iters))
            end = first
        schedule.append(segments)
    return schedule


# -- which launch for which shape ---------------------------------------------------------------
def split_for_programs(
    n: int, k: int, block_n: int, block_k: int, target: int = TARGET_PROGRAMS, min_tiles: int = 4
) -> int:
    """The power-of-two split-K that brings N / block_n programs up to `target`, each split
    keeping at least `min_tiles` K tiles."""
    programs = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while programs * split < target and k_tiles // (2 * split) >= min_tiles:
        split *= 2
    return split


def heuristic_config(m: int, n: int, k: int, dtype: torch.dtype) -> SkinnyConfig | None:
    """A launch for shapes the table does not hold: all of M in one program, 64-row weight
    slabs, split-K until there are TARGET_PROGRAMS programs (each keeping >= 4 K tiles)."""
    if dtype not in DTYPE_NAMES or not 1 <= m <= HEURISTIC_MAX_M or n < 1 or k < 16:
        return None
    block_m = max(16, triton.next_power_of_2(m))
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    block_n = 64
    split = split_for_programs(n, k, block_n, block_k)
    return SkinnyConfig(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split)


TableKey = tuple[str, str, int, int]  # (op, dtype name, n, k)


@functools.cache
def _table(path: str) -> dict[TableKey, list[tuple[int, SkinnyConfig | None]]]:
    """(op, dtype name, n, k) -> [(m, config or None)] sorted by m, from the sweep's JSON.
    An entry's "op" is one of OPS ("linear" when absent): the plain GEMM, or the down
    projection with SiLU-and-multiply fused into its A-operand load."""
    file = Path(path)
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    table: dict[TableKey, list[tuple[int, SkinnyConfig | None]]] = {}
    for entry in data.get("entries", []):
        op = entry.get("op", LINEAR)
        if op not in OPS:
            raise ValueError(f"{path}: an entry's op must be one of {OPS}, got {op!r}")
        config = entry.get("config")
        key = (op, entry["dtype"], int(entry["n"]), int(entry["k"]))
        table.setdefault(key, []).append(
            (int(entry["m"]), SkinnyConfig.from_dict(config) if config else None)
        )
    for rows in table.values():
        rows.sort(key=lambda row: row[0])
    return table


def table_path() -> str:
    return os.environ.get(TABLE_ENV) or str(DEFAULT_TABLE)


def table_device(path: str | None = None) -> str | None:
    """The device name the table at `path` (default: `table_path()`, read at each call:
    $PPRUNTIME_SKINNY_GEMM_TABLE may change) was measured on."""
    return _table_device(path or table_path())


@functools.cache
def _table_device(path: str) -> str | None:
    file = Path(path)
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("device")


@functools.lru_cache(maxsize=4096)
def _lookup(
    op: str, m: int, n: int, k: int, dtype: torch.dtype, path: str, measured_only: bool
) -> SkinnyConfig | None:
    if not 1 <= m <= MAX_M or dtype not in DTYPE_NAMES:
        return None
    rows = _table(path).get((op, DTYPE_NAMES[dtype], n, k))
    if rows is None:
        return None if measured_only else heuristic_config(m, n, k, dtype)
    # the entry measured at the smallest batch that is at least m (a padded bucket); none
    # above the largest measured batch
    for measured_m, config in rows:
        if measured_m >= m:
            return config
    return None


def skinny_config(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    measured_only: bool = False,
    table: str | None = None,
) -> SkinnyConfig | None:
    """The best-known launch for y[m, n] = x[m, k] @ W[n, k]^T, or None: use torch / cuBLAS.

    A shape the table (the file `table`, default `table_path()`) holds gets its measured
    entry (None where cuBLAS won); others get `heuristic_config`, or None with
    `measured_only`."""
    return _lookup(LINEAR, m, n, k, dtype, table or table_path(), measured_only)


def silu_mul_config(m: int, n: int, k: int, dtype: torch.dtype) -> SkinnyConfig | None:
    """The measured launch of `skinny_gemm_silu_mul` for gate_up [m, 2k] and W [n, k], or
    None: run silu_and_mul and then the plain GEMM (two kernels). Only the table's
    "silu_mul_linear" entries give one (no heuristic): the fused launch is used where the
    sweep timed it faster than the two-kernel path."""
    return _lookup(SILU_MUL_LINEAR, m, n, k, dtype, table_path(), True)


def has_silu_mul_launches() -> bool:
    """Whether the table (`table_path()`) holds any fused launch (for the start-up log)."""
    return any(
        config is not None
        for (op, *_), rows in _table(table_path()).items()
        if op == SILU_MUL_LINEAR
        for _, config in rows
    )
