"""Sweep the skinny decode GEMM's launches against cuBLAS; write the launch table.

    python scripts/sweep_decode_gemm.py --out ppruntime/kernels/skinny_gemm_table.json  # CUDA
    TRITON_INTERPRET=1 python scripts/sweep_decode_gemm.py --small --out /tmp/t.json     # CPU

For each projection of the 1B and 8B models (merged qkv, o, merged gate_up, down, LM head)
at decode batches M (--batches: 64, 32, 16 by default, the bench's batch 64 first; `all`
for every graph bucket up to 64), it checks every candidate launch of
ppruntime/kernels/skinny_gemm.py against torch.matmul (bf16 tolerance) and times it
beside cuBLAS (F.linear), each replayed from a CUDA graph of back-to-back calls (no host
launch cost) that cycle through enough copies of the weight to overflow the L2 cache, as
a model's layers do (each weight byte comes from HBM). Candidates, in three rounds: the
tiles (BLOCK_N x BLOCK_K, plain loads, split-K from the program count, stages from the
shared memory); for the two fastest tiles (--small: the fastest) split-K 1..16 by fp32
partials; around the fastest split, atomics, TMA weights, unswapped tiles, 8 warps and a
stage less and more. A candidate that fails
(compile, launch, numerics) is reported and skipped. Per case it prints the best launch,
its time, its fraction of the copy bandwidth and cuBLAS's time over it (> 1: faster).

--out writes the table `skinny_config` reads: one entry per (dtype, M, N, K) with the best
launch, or null where it does not beat cuBLAS by --margin; plus each case's candidates.
The engine reads ppruntime/kernels/skinny_gemm_table.json, or $PPRUNTIME_SKINNY_GEMM_TABLE.
--budget-s stops starting new cases after that many seconds (the rest are listed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import SHAPES, copy_bandwidth, replayed_seconds
from profile_decode import projection_shapes

from ppruntime.kernels import skinny_gemm as sg
from ppruntime.stage.graphs import capture_sizes

SMEM_BYTES = 227 * 1024  # an H100 / H200 SM's shared memory per block
PIPELINE_BYTES = 160 * 1024  # shared memory in flight per program that round 1 aims at
L2_OVERFLOW_BYTES = 256 << 20  # weight copies cycled per graph: several times the 50 MB L2


def stage_bytes(config: sg.SkinnyConfig, element_bytes: int) -> int:
    """Shared memory of the software pipeline: one W and one x tile per stage."""
    tile = (config.block_n + config.block_m) * config.block_k * element_bytes
    return config.num_stages * tile


def tile_candidates(m: int, n: int, k: int, small: bool, element_bytes: int):
    """Round 1: the tiles, each with the split-K that fills the GPU and the stages that
    keep about PIPELINE_BYTES of shared memory in flight."""
    block_m = max(16, 1 << (m - 1).bit_length())
    block_ns = (32,) if small else (32, 64, 128)
    block_ks = (16, 32) if small else (64, 128, 256)
    for block_n, block_k in itertools.product(block_ns, block_ks):
        if block_k > max(16, 1 << (k - 1).bit_length()):
            continue
        config = sg.SkinnyConfig(
            block_m=block_m,
            block_n=block_n,
            block_k=block_k,
            num_stages=1,
            split_k=sg.split_for_programs(n, k, block_n, block_k),
        )
        stages = (
            2 if small else max(2, min(6, PIPELINE_BYTES // stage_bytes(config, element_bytes)))
        )
        config = replace(config, num_stages=stages)
        if stage_bytes(config, element_bytes) <= SMEM_BYTES:
            yield config


def split_candidates(tile: sg.SkinnyConfig, k: int, small: bool):
    """Round 2, for one of the fastest tiles: every split-K (partials, plain loads)."""
    k_tiles = -(-k // tile.block_k)
    for split in (1, 2) if small else (1, 2, 4, 8, 16):
        if split <= k_tiles:
            yield replace(tile, split_k=split, reduction="partials", weights="pointer")


def variants(config: sg.SkinnyConfig, small: bool, element_bytes: int):
    """Round 3, around the fastest split: atomics, TMA weights, the other tile orientation,
    more warps, a stage less and more."""
    if config.split_k > 1:
        yield replace(config, reduction="atomic")
        yield replace(config, reduction="atomic", weights="descriptor")
    yield replace(config, weights="descriptor")
    yield replace(config, swap_ab=not config.swap_ab)
    if not small:
        yield replace(config, num_warps=8)
        if config.num_stages > 2:
            yield replace(config, num_stages=config.num_stages - 1)
        deeper = replace(config, num_stages=config.num_stages + 1)
        if stage_bytes(deeper, element_bytes) <= SMEM_BYTES:
            yield deeper


class Rotating:
    """`copies` weights of one shape, handed out in turn: consecutive calls in a graph read
    different memory, so the L2 cache cannot serve them."""

    def __init__(self, weight: torch.Tensor, copies: int) -> None:
        self.weights = [weight] + [weight.clone() for _ in range(copies - 1)]
        self.next = 0

    def __call__(self) -> torch.Tensor:
        weight = self.weights[self.next % len(self.weights)]
        self.next += 1
        return weight


def check(out: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """Max abs error over max |exact|; raises if beyond the dtype's tolerance."""
    scale = exact.abs().max().item() or 1.0
    error = (out.float() - exact).abs().max().item() / scale
    limit = 1e-5 if dtype == torch.float32 else 2e-2
    if not error <= limit:  # catches NaN too
        raise ValueError(f"max error {error:.3g} of max |y| is beyond the tolerance {limit}")
    return error


def time_case(args, device, dtype, bandwidth, m, n, k, label) -> dict:
    element_bytes = torch.empty((), dtype=dtype).element_size()
    weight_bytes = n * k * element_bytes
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(n, k, device=device, dtype=dtype, generator=generator) / k**0.5
    exact = torch.matmul(x.float(), weight.float().t())
    copies = 1 if device.type != "cuda" else max(1, min(32, -(-L2_OVERFLOW_BYTES // weight_bytes)))
    weights = Rotating(weight, copies)
    # as many calls as take ~2 ms from HBM (at least 4), per graph replay
    calls = 4 if device.type != "cuda" else max(4, min(400, int(2e-3 * bandwidth / weight_bytes)))

    def timed(fn) -> float:
        return replayed_seconds(lambda: fn(weights()), calls, device)

    cublas_s = timed(lambda w: F.linear(x, w))
    case = {
        "dtype": sg.DTYPE_NAMES[dtype],
        "m": m,
        "n": n,
        "k": k,
        "label": label,
        "weight_bytes": weight_bytes,
        "cublas_us": cublas_s * 1e6,
        "cublas_bandwidth_fraction": weight_bytes / cublas_s / bandwidth,
        "candidates": [],
    }
    tried: dict[sg.SkinnyConfig, dict] = {}

    def measure(config: sg.SkinnyConfig) -> dict:
        if config in tried:
            return tried[config]
        row = tried[config] = {"config": config.as_dict(), "describe": config.describe()}
        try:
            row["max_error"] = check(sg.skinny_gemm(x, weight, None, config), exact, dtype)
            seconds = timed(lambda w: sg.skinny_gemm(x, w, None, config))
            row["us"] = seconds * 1e6
            row["bandwidth_fraction"] = weight_bytes / seconds / bandwidth
        except Exception as exc:  # reported, not fatal: the next candidate runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        case["candidates"].append(row)
        return row

    def fastest(rows: list[dict], count: int) -> list[sg.SkinnyConfig]:
        ranked = sorted((row for row in rows if "us" in row), key=lambda row: row["us"])
        return [sg.SkinnyConfig.from_dict(row["config"]) for row in ranked[:count]]

    tiles = [measure(config) for config in tile_candidates(m, n, k, args.small, element_bytes)]
    for tile in fastest(tiles, 1 if args.small else 2):
        splits = [measure(config) for config in split_candidates(tile, k, args.small)]
        # --small: every split's variants, so that each reduction is checked
        for config in fastest(splits, len(splits) if args.small else 1):
            for variant in variants(config, args.small, element_bytes):
                measure(variant)
    timed_rows = [row for row in case["candidates"] if "us" in row]
    best = min(timed_rows, key=lambda row: row["us"]) if timed_rows else None
    case["best"] = best
    wins = best is not None and best["us"] < case["cublas_us"] * (1 - args.margin)
    case["config"] = best["config"] if wins else None
    failed = len(case["candidates"]) - len(timed_rows)
    cublas = f"cuBLAS {case['cublas_us']:.1f} us ({case['cublas_bandwidth_fraction']:.0%})"
    failures = f"; {failed} of {len(case['candidates'])} candidates failed" if failed else ""
    if best is None:
        print(f"{label} [{m}x{k}x{n}]: every candidate failed; {cublas}", flush=True)
    else:
        print(
            f"{label} [{m}x{k}x{n}]: best {best['describe']}: {best['us']:.1f} us "
            f"({best['bandwidth_fraction']:.0%} of copy bw), {cublas}, "
            f"cuBLAS / best {case['cublas_us'] / best['us']:.2f} "
            f"-> {'skinny' if wins else 'cuBLAS'}{failures}",
            flush=True,
        )
    return case


def batches(spec: str) -> list[int]:
    if spec == "all":
        return sorted(capture_sizes(64), reverse=True)
    return [int(value) for value in spec.split(",")]


def sweep(args, device: torch.device) -> dict:
    started = time.monotonic()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(device, args.small)
    shape_names = ["small"] if args.small else args.shapes.split(",")
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_bandwidth": bandwidth,
        "margin": args.margin,
        "entries": [],
        "cases": [],
        "skipped": [],
    }
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {dtype}", flush=True)
    for m in batches(args.batches):
        for shape_name in shape_names:
            for name, (n, k) in projection_shapes(SHAPES[shape_name]).items():
                if name not in args.projections.split(","):
                    continue
                label = f"{shape_name} {name} m{m}"
                if time.monotonic() - started > args.budget_s:
                    result["skipped"].append(label)
                    continue
                try:
                    case = time_case(args, device, dtype, bandwidth, m, n, k, label)
                except Exception as exc:  # cuBLAS itself or the set-up failed: report, go on
                    print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)
                    result["skipped"].append(f"{label} ({type(exc).__name__}: {str(exc)[:200]})")
                    continue
                result["cases"].append(case)
                entry = {key: case[key] for key in ("dtype", "m", "n", "k", "config", "label")}
                if case["best"] is not None:
                    entry["us"] = case["best"]["us"]
                entry["cublas_us"] = case["cublas_us"]
                result["entries"].append(entry)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["steps"] = step_estimates(result["cases"], shape_names)
    if result["skipped"]:
        print(f"skipped (budget {args.budget_s:.0f} s): {', '.join(result['skipped'])}")
    print(f"sweep took {time.monotonic() - started:.0f} s", flush=True)
    return result


def step_us(rows: dict[str, dict], layers: int, chosen) -> float:
    layer = sum(chosen(rows[name]) for name in ("qkv", "o", "gate_up", "down"))
    return layers * layer + chosen(rows["lm_head"])


def step_estimates(cases: list[dict], shape_names: list[str]) -> dict:
    """Per model and batch: a decode step's matmul time (every layer's four projections and
    the LM head) with cuBLAS alone and with the table's choices, from the times above."""
    estimates = {}
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        for m in sorted({case["m"] for case in cases}):
            rows = {
                case["label"].split()[1]: case
                for case in cases
                if case["m"] == m and case["label"].startswith(f"{shape_name} ")
            }
            if len(rows) < 5:
                continue

            layers = shape.num_hidden_layers
            cublas_us = step_us(rows, layers, lambda case: case["cublas_us"])
            table_us = step_us(
                rows,
                layers,
                lambda case: case["best"]["us"] if case["config"] else case["cublas_us"],
            )
            estimates[f"{shape_name} m{m}"] = {
                "cublas_ms": cublas_us / 1e3,
                "table_ms": table_us / 1e3,
            }
            print(
                f"{shape_name} m{m}: a decode step's matmuls {cublas_us / 1e3:.2f} ms with cuBLAS, "
                f"{table_us / 1e3:.2f} ms with the table ({cublas_us / table_us:.2f}x)",
                flush=True,
            )
    return estimates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the table's JSON (skinny_config reads it)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and grid (CPU flow)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--batches", default="64,32,16", help="comma list, or 'all' buckets")
    parser.add_argument("--projections", default="qkv,o,gate_up,down,lm_head")
    parser.add_argument("--margin", type=float, default=0.03, help="how much faster than cuBLAS")
    parser.add_argument("--budget-s", type=float, default=170.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.small:  # one batch, the qkv (no split-K) and down (split-K) shapes
        args.batches = "5" if args.batches == "64,32,16" else args.batches
        if args.projections == "qkv,o,gate_up,down,lm_head":
            args.projections = "qkv,down"
    result = sweep(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
