"""Sweep the skinny decode GEMM's launches against cuBLAS; write the launch table.

    python scripts/sweep_decode_gemm.py --out ppruntime/kernels/skinny_gemm_table.json  # CUDA
    TRITON_INTERPRET=1 python scripts/sweep_decode_gemm.py --small --out /tmp/t.json     # CPU
    # only the fused SiLU-and-mul down projections (~2 min on an H200), merged into the table:
    python scripts/sweep_decode_gemm.py --fused-only --budget-s 90 \
        --out ppruntime/kernels/skinny_gemm_table.json

For each projection of the 1B and 8B models (merged qkv, o, merged gate_up, down, LM head)
at decode batches M (--batches: 64, 32, 16 by default, the bench's batch 64 first; `all`
for every graph bucket up to 64), it checks every candidate launch of
ppruntime/kernels/skinny_gemm.py against torch.matmul (bf16 tolerance) and times it
beside cuBLAS (F.linear), each replayed from a CUDA graph of back-to-back calls (no host
launch cost) that cycle through enough copies of the weight to overflow the L2 cache, as
a model's layers do (each weight byte comes from HBM). Candidates, in three rounds: the
tiles (BLOCK_N x BLOCK_K, plain loads, split-K from the program count, stages from the
shared memory); for the two fastest tiles (--small: the fastest) split-K 1..16 by fp32
partials, and stream-K on 1 and 2 persistent programs per SM (SkinnyConfig.programs; the
SM count from the device; --small: 3 and 5 programs); around the fastest of those,
atomics, TMA weights, unswapped tiles, 8 warps and a stage less and more. A candidate that
fails (compile, launch, numerics) is reported and skipped. Per case it prints the best launch,
its time, its fraction of the copy bandwidth and cuBLAS's time over it (> 1: faster).

"silu_down" is the down projection with SiLU-and-multiply fused into its A-operand load
(skinny_gemm_silu_mul, x = the [M, 2I] gate_up tensor): the same rounds of candidates, timed
against what the runtime runs without it, the silu_and_mul kernel followed by cuBLAS and by
the plain skinny GEMM where the table has a launch for the down shape (this run's down case,
else --base's entry); the fused launch wins only if faster than both by --margin. Each case
also reports the two-kernel time with the fused winner's own tiles (what the fusion alone
saves). --fused-only sweeps only these cases and, with --out, writes --base (default: the
table the engine reads) with its fused entries for the measured batches replaced, its other
entries kept (refused if --base was measured on another device, or is named and
missing).

--out writes the table `skinny_config` reads: one entry per (op, dtype, M, N, K) with the
best launch, or null where it does not beat the alternative by --margin; plus each case's
candidates. The engine reads ppruntime/kernels/skinny_gemm_table.json, or
$PPRUNTIME_SKINNY_GEMM_TABLE. --budget-s stops starting new cases after that many seconds
(the rest are listed).
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

from ppruntime.kernels import activation
from ppruntime.kernels import skinny_gemm as sg
from ppruntime.stage.graphs import capture_sizes

SMEM_BYTES = 227 * 1024  # an H100 / H200 SM's shared memory per block
PIPELINE_BYTES = 160 * 1024  # shared memory in flight per program that round 1 aims at
L2_OVERFLOW_BYTES = 256 << 20  # weight copies cycled per graph: several times the 50 MB L2


FUSED = "silu_down"  # the down projection with SiLU-and-multiply fused into its A operand


def stage_bytes(config: sg.SkinnyConfig, element_bytes: int, x_tiles: int = 1) -> int:
    """Shared memory of the software pipeline: one W and `x_tiles` x tiles per stage (the
    fused kernel loads a gate and an up tile)."""
    tile = (config.block_n + x_tiles * config.block_m) * config.block_k * element_bytes
    return config.num_stages * tile


def tile_candidates(m: int, n: int, k: int, small: bool, element_bytes: int, x_tiles: int = 1):
    """Round 1: the tiles, each with the split-K that fills the GPU and the stages that
    keep about PIPELINE_BYTES of shared memory in flight. The fused kernel (x_tiles 2) also
    tries 256-row weight slabs: each of the N / BLOCK_N programs on a K range recomputes
    that range's activation (two SFU operations an element), so wider slabs do less of it."""
    block_m = max(16, 1 << (m - 1).bit_length())
    block_ns = (32,) if small else (32, 64, 128, 256) if x_tiles > 1 else (32, 64, 128)
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
        per_stage = stage_bytes(config, element_bytes, x_tiles)
        stages = 2 if small else max(2, min(6, PIPELINE_BYTES // per_stage))
        config = replace(config, num_stages=stages)
        if stage_bytes(config, element_bytes, x_tiles) <= SMEM_BYTES:
            yield config


def split_candidates(tile: sg.SkinnyConfig, k: int, small: bool):
    """Round 2, for one of the fastest tiles: every split-K (partials, plain loads)."""
    k_tiles = -(-k // tile.block_k)
    for split in (1, 2) if small else (1, 2, 4, 8, 16):
        if split <= k_tiles:
            yield replace(tile, split_k=split, reduction="partials", weights="pointer")


def stream_k_grids(device: torch.device, small: bool) -> tuple[tuple[int, int], ...]:
    """Stream-K's persistent grids as (programs, programs per SM): 1 and 2 per SM of the
    device (--small: 3 and 5 programs, so that the tiny shapes' tiles are split)."""
    if small:
        return ((3, 1), (5, 1))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 132  # an H100 / H200
    return ((sms, 1), (2 * sms, 2))


def stream_k_candidates(
    tile: sg.SkinnyConfig, grids: tuple[tuple[int, int], ...], element_bytes: int, x_tiles: int
):
    """Round 2, beside the splits: the same tile on stream-K's persistent grids (plain
    loads). With 2 programs per SM each gets half its shared memory: the stages are cut to
    fit, as the grid is meant to be resident at once."""
    per_stage = stage_bytes(replace(tile, num_stages=1), element_bytes, x_tiles)
    for programs, per_sm in grids:
        stages = min(tile.num_stages, SMEM_BYTES // per_sm // per_stage)
        if stages >= 2:
            yield replace(
                tile,
                split_k=1,
                reduction="partials",
                weights="pointer",
                programs=programs,
                num_stages=stages,
            )


def variants(config: sg.SkinnyConfig, small: bool, element_bytes: int, x_tiles: int = 1):
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
        if stage_bytes(deeper, element_bytes, x_tiles) <= SMEM_BYTES:
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


def time_case(args, device, dtype, bandwidth, m, n, k, label, plain_config=None) -> dict:
    """One (projection, M) case: every candidate launch checked and timed beside cuBLAS.
    A FUSED case (label's projection "silu_down") times skinny_gemm_silu_mul on gate_up
    [M, 2K] against silu_and_mul followed by cuBLAS and, given `plain_config` (the table's
    launch for the down shape), by the plain skinny GEMM."""
    fused = label.split()[1] == FUSED
    element_bytes = torch.empty((), dtype=dtype).element_size()
    weight_bytes = n * k * element_bytes
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, 2 * k if fused else k, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(n, k, device=device, dtype=dtype, generator=generator) / k**0.5
    if fused:
        gate, up = x.float().chunk(2, dim=-1)
        exact = torch.matmul(F.silu(gate) * up, weight.float().t())
    else:
        exact = torch.matmul(x.float(), weight.float().t())
    copies = 1 if device.type != "cuda" else max(1, min(32, -(-L2_OVERFLOW_BYTES // weight_bytes)))
    weights = Rotating(weight, copies)
    # as many calls as take ~2 ms from HBM (at least 4), per graph replay
    calls = 4 if device.type != "cuda" else max(4, min(400, int(2e-3 * bandwidth / weight_bytes)))

    def timed(fn) -> float:
        return replayed_seconds(lambda: fn(weights()), calls, device)

    def launch(w: torch.Tensor, config: sg.SkinnyConfig) -> torch.Tensor:
        if fused:
            return sg.skinny_gemm_silu_mul(x, w, None, config)
        return sg.skinny_gemm(x, w, None, config)

    def two_kernels(config: sg.SkinnyConfig | None):
        """silu_and_mul, then cuBLAS (config None) or the plain skinny GEMM."""
        if config is None:
            return lambda w: F.linear(activation.silu_and_mul(x), w)
        return lambda w: sg.skinny_gemm(activation.silu_and_mul(x), w, None, config)

    cublas_s = timed(two_kernels(None) if fused else lambda w: F.linear(x, w))
    case = {
        "op": sg.SILU_MUL_LINEAR if fused else sg.LINEAR,
        "dtype": sg.DTYPE_NAMES[dtype],
        "m": m,
        "n": n,
        "k": k,
        "label": label,
        "weight_bytes": weight_bytes,
        "cublas_us": cublas_s * 1e6,  # FUSED: silu_and_mul + cuBLAS
        "cublas_bandwidth_fraction": weight_bytes / cublas_s / bandwidth,
        "candidates": [],
    }
    alternative_us = case["cublas_us"]  # what the runtime would run instead of the best
    if fused and plain_config is not None:
        case["plain_config"] = plain_config.as_dict()
        case["plain_skinny_us"] = timed(two_kernels(plain_config)) * 1e6
        alternative_us = min(alternative_us, case["plain_skinny_us"])
    x_tiles = 2 if fused else 1
    tried: dict[sg.SkinnyConfig, dict] = {}

    def measure(config: sg.SkinnyConfig) -> dict:
        if config in tried:
            return tried[config]
        row = tried[config] = {"config": config.as_dict(), "describe": config.describe()}
        try:
            row["max_error"] = check(launch(weight, config), exact, dtype)
            seconds = timed(lambda w: launch(w, config))
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

    tiles = [
        measure(config) for config in tile_candidates(m, n, k, args.small, element_bytes, x_tiles)
    ]
    # --fused-only: round 2 for the fastest tile alone (the lead's run should take ~2 min)
    grids = stream_k_grids(device, args.small)
    for tile in fastest(tiles, 1 if args.small or args.fused_only else 2):
        splits = [measure(config) for config in split_candidates(tile, k, args.small)]
        splits += [
            measure(config) for config in stream_k_candidates(tile, grids, element_bytes, x_tiles)
        ]
        # --small: every split's variants, so that each reduction is checked
        for config in fastest(splits, len(splits) if args.small else 1):
            for variant in variants(config, args.small, element_bytes, x_tiles):
                measure(variant)
    timed_rows = [row for row in case["candidates"] if "us" in row]
    best = min(timed_rows, key=lambda row: row["us"]) if timed_rows else None
    case["best"] = best
    wins = best is not None and best["us"] < alternative_us * (1 - args.margin)
    case["config"] = best["config"] if wins else None
    case["alternative_us"] = alternative_us
    failed = len(case["candidates"]) - len(timed_rows)
    cublas = f"cuBLAS {case['cublas_us']:.1f} us ({case['cublas_bandwidth_fraction']:.0%})"
    if fused:
        cublas = "silu_and_mul + " + cublas
        if "plain_skinny_us" in case:
            cublas += f", silu_and_mul + skinny {case['plain_skinny_us']:.1f} us"
        if best is not None:  # the fusion alone: the winner's own tiles as two kernels
            best_config = sg.SkinnyConfig.from_dict(best["config"])
            case["same_tiles_two_kernels_us"] = timed(two_kernels(best_config)) * 1e6
            cublas += f" (with its tiles {case['same_tiles_two_kernels_us']:.1f} us)"
    failures = f"; {failed} of {len(case['candidates'])} candidates failed" if failed else ""
    if best is None:
        print(f"{label} [{m}x{k}x{n}]: every candidate failed; {cublas}", flush=True)
    else:
        chosen = (
            ("fused" if fused else "skinny") if wins else ("two kernels" if fused else "cuBLAS")
        )
        print(
            f"{label} [{m}x{k}x{n}]: best {best['describe']}: {best['us']:.1f} us "
            f"({best['bandwidth_fraction']:.0%} of copy bw), {cublas}, "
            f"alternative / best {alternative_us / best['us']:.2f} -> {chosen}{failures}",
            flush=True,
        )
    return case


def batches(spec: str) -> list[int]:
    if spec == "all":
        return sorted(capture_sizes(64), reverse=True)
    return [int(value) for value in spec.split(",")]


def cases_of(shape_name: str, projections: list[str]):
    """(projection, (n, k)) of one model in sweep order: FUSED right after down, whose
    launch it is timed against."""
    for name, shape in projection_shapes(SHAPES[shape_name]).items():
        if name in projections:
            yield name, shape
        if name == "down" and FUSED in projections:
            yield FUSED, shape


def sweep(args, device: torch.device) -> dict:
    started = time.monotonic()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = usable_base(args, device_name)
    bandwidth = copy_bandwidth(device, args.small)
    shape_names = ["small"] if args.small else args.shapes.split(",")
    result = {
        "device": device_name,
        "copy_bandwidth": bandwidth,
        "margin": args.margin,
        "entries": [],
        "cases": [],
        "skipped": [],
    }
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {dtype}", flush=True)
    for m in batches(args.batches):
        for shape_name in shape_names:
            plain_configs: dict[tuple[int, int], sg.SkinnyConfig | None] = {}
            for name, (n, k) in cases_of(shape_name, args.projections.split(",")):
                label = f"{shape_name} {name} m{m}"
                if time.monotonic() - started > args.budget_s:
                    result["skipped"].append(label)
                    continue
                if name == FUSED and (n, k) in plain_configs:  # this run's down case
                    plain_config = plain_configs[(n, k)]
                elif name == FUSED and base is not None:  # the base table's down launch
                    plain_config = sg.skinny_config(m, n, k, dtype, True, str(base))
                else:
                    plain_config = None
                try:
                    case = time_case(args, device, dtype, bandwidth, m, n, k, label, plain_config)
                except Exception as exc:  # cuBLAS itself or the set-up failed: report, go on
                    print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)
                    result["skipped"].append(f"{label} ({type(exc).__name__}: {str(exc)[:200]})")
                    continue
                if name != FUSED:
                    config = case["config"]
                    plain_configs[(n, k)] = sg.SkinnyConfig.from_dict(config) if config else None
                result["cases"].append(case)
                keys = ("op", "dtype", "m", "n", "k", "config", "label")
                entry = {key: case[key] for key in keys}
                if case["best"] is not None:
                    entry["us"] = case["best"]["us"]
                entry["cublas_us"] = case["cublas_us"]
                if name == FUSED:
                    entry["alternative_us"] = case["alternative_us"]
                result["entries"].append(entry)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    result["steps"] = step_estimates(result["cases"], shape_names)
    if result["skipped"]:
        print(f"skipped (budget {args.budget_s:.0f} s): {', '.join(result['skipped'])}")
    print(f"sweep took {time.monotonic() - started:.0f} s", flush=True)
    if args.fused_only and base is not None:
        return merged_into_base(result, base)
    return result


def usable_base(args, device_name: str) -> Path | None:
    """--base (default: the table the engine reads) if it exists and was measured on a
    device of this name. --fused-only --out refuses another device's (it would write that
    device's launches under this one's name) and a named one that is missing; otherwise
    its launches are not used."""
    path = Path(args.base or sg.table_path())
    if not path.is_file():
        if args.base and args.fused_only and args.out:  # --out would keep none of its entries
            raise SystemExit(f"--base {path} does not exist: pass an existing table")
        print(f"no base table at {path}", flush=True)
        return None
    measured_on = sg.table_device(str(path))
    if measured_on == device_name:
        return path
    if args.fused_only and args.out:
        raise SystemExit(
            f"--base {path} was measured on {measured_on!r}, this device is {device_name!r}: "
            "pass --base with this device's table, or run the whole sweep (without "
            "--fused-only)"
        )
    print(f"the base table {path} is {measured_on!r}'s: not used on {device_name!r}", flush=True)
    return None


def merged_into_base(result: dict, base: Path) -> dict:
    """--fused-only: the base table with the fused entries just measured in place of its
    own for those (op, dtype, M, N, K), every other entry kept; the fused sweep's cases and
    step savings under "fused_sweep"."""
    table = json.loads(base.read_text())
    measured = {key_of(entry) for entry in result["entries"]}
    kept = [entry for entry in table.get("entries", []) if key_of(entry) not in measured]
    fused_sweep = {key: result[key] for key in ("copy_bandwidth", "margin", "cases", "skipped")}
    fused_sweep["steps"] = result["steps"]
    fused_sweep["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    merged = {**table, "device": result["device"], "entries": kept + result["entries"]}
    merged["fused_sweep"] = fused_sweep
    return merged


def key_of(entry: dict) -> tuple:
    return (entry.get("op", sg.LINEAR), entry["dtype"], entry["m"], entry["n"], entry["k"])


def step_us(rows: dict[str, dict], layers: int, chosen) -> float:
    layer = sum(chosen(rows[name]) for name in ("qkv", "o", "gate_up", "down"))
    return layers * layer + chosen(rows["lm_head"])


def step_estimates(cases: list[dict], shape_names: list[str]) -> dict:
    """Per model and batch: a decode step's matmul time (every layer's four projections and
    the LM head) with cuBLAS alone and with the table's choices, from the times above; and
    what the fused SiLU-and-mul down projection saves per step where the table takes it
    (its alternative's time less its own, every layer)."""
    estimates = {}
    for shape_name in shape_names:
        shape = SHAPES[shape_name]
        layers = shape.num_hidden_layers
        for m in sorted({case["m"] for case in cases}):
            rows = {
                case["label"].split()[1]: case
                for case in cases
                if case["m"] == m and case["label"].startswith(f"{shape_name} ")
            }
            estimate = {}
            if all(name in rows for name in ("qkv", "o", "gate_up", "down", "lm_head")):
                cublas_us = step_us(rows, layers, lambda case: case["cublas_us"])
                table_us = step_us(
                    rows,
                    layers,
                    lambda case: case["best"]["us"] if case["config"] else case["cublas_us"],
                )
                estimate = {"cublas_ms": cublas_us / 1e3, "table_ms": table_us / 1e3}
                print(
                    f"{shape_name} m{m}: a decode step's matmuls {cublas_us / 1e3:.2f} ms with "
                    f"cuBLAS, {table_us / 1e3:.2f} ms with the table ({cublas_us / table_us:.2f}x)",
                    flush=True,
                )
            fused = rows.get(FUSED)
            if fused is not None:
                saved_us = fused["alternative_us"] - fused["best"]["us"] if fused["config"] else 0
                estimate["silu_down_saving_ms"] = layers * saved_us / 1e3
                print(
                    f"{shape_name} m{m}: the fused SiLU-and-mul down projection saves "
                    f"{layers * saved_us / 1e3:.3f} ms a step ({layers} layers)",
                    flush=True,
                )
            if estimate:
                estimates[f"{shape_name} m{m}"] = estimate
    return estimates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the table's JSON (skinny_config reads it)")
    parser.add_argument("--small", action="store_true", help="tiny shapes and grid (CPU flow)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--batches", default="64,32,16", help="comma list, or 'all' buckets")
    parser.add_argument("--projections", default=f"qkv,o,gate_up,down,{FUSED},lm_head")
    parser.add_argument(
        "--fused-only",
        action="store_true",
        help=f"only the {FUSED} cases; --out merges them into --base",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="the table whose plain down launches the fused cases are timed against where "
        "this run has none, and that --fused-only --out keeps the other entries of "
        "(default: the table the engine reads)",
    )
    parser.add_argument(
        "--margin", type=float, default=0.03, help="how much faster than the alternative"
    )
    parser.add_argument("--budget-s", type=float, default=170.0)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default_projections = parser.get_default("projections")
    if args.fused_only:
        args.projections = FUSED
    if args.small:  # one batch, the qkv (no split-K) and down (split-K) shapes
        args.batches = "5" if args.batches == "64,32,16" else args.batches
        if args.projections == default_projections:
            args.projections = "qkv,down"
    result = sweep(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
