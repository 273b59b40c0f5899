"""Sweep the Triton prefill attention candidates on the GPU: correctness against the current
kernel and TFLOP/s against the bf16 matmul peak measured in the same process.

    PYTHONPATH=$PWD python scripts/sweep_prefill_attention.py --out sweep.json   # H200: < 4 min
    python scripts/sweep_prefill_attention.py --small --out x.json   # CPU, interpreted, tiny

For each prefill kernel variant (`ppruntime.kernels.paged_attention.PREFILL_VARIANTS`) and
a bounded list of tile / warp / stage configurations it runs `paged_attention` on the
Llama-3.1-8B attention shape (32 q heads, 8 KV heads, head_dim 128, paged cache with
16-token blocks scattered over the pool; q, k, v views of one fused qkv buffer, as the
engine has them) for causal prefills of 2048, 4096 and 8192 tokens and a 2048-token chunk
over a 2048-token cached prefix, checks the output against the current default kernel
("tiled" as `prefill_launch` picks it; |diff| <= ATOL + RTOL * |reference|, bf16), and
times it with CUDA events (warm-up, median of several). torch's
scaled_dot_product_attention on contiguous tensors is timed beside them for scale (and
checks the default kernel on the prompts without a prefix).

Configurations run in rounds (every variant's default configuration first, then the
others), and no new one starts once --budget-s has passed: the ones skipped are listed.
A configuration that fails to compile, raises, or differs is reported, never fatal;
after an error that leaves the CUDA context unusable the sweep stops and says so.
The JSON goes to --out; a table sorted by the 4096-token fraction is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run interpreted on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import attention_prefill_flops
from bench_gpu import matmul_throughput

from ppruntime.kernels.paged_attention import (
    PREFILL_VARIANTS,
    AttentionLaunch,
    paged_attention,
    prefill_launch,
)

# |out - reference| <= ATOL + RTOL * |reference|: bf16 rounds q, p and the output (an
# output of magnitude 2-4, a row with few keys, is 1/64 apart at one bf16 step)
ATOL = 1e-2
RTOL = 2e-2


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int


@dataclass(frozen=True)
class Case:
    name: str
    prefix: int  # keys already cached
    tokens: int  # this chunk's new tokens (queries)


FULL_SHAPE = Shape(32, 8, 128, 16)
FULL_CASES = [
    Case("prefill-4096", 0, 4096),
    Case("prefill-2048", 0, 2048),
    Case("prefill-8192", 0, 8192),
    Case("prefix-2048+2048", 2048, 2048),
]
SMALL_SHAPE = Shape(8, 2, 64, 16)
SMALL_CASES = [Case("prefill-64", 0, 64), Case("prefix-32+32", 32, 32)]

# (block_m, block_n, num_warps, num_stages): the first is prefill_launch's own for the
# 8B shape; then in order of promise (compiled for sm_90 here: 128 x 64 with 8 warps and
# 64 x 64 with 4 warps, two CTAs an SM, do not spill; 128-row tiles with 4 warps spill
# hundreds of bytes and are left out)
FULL_CONFIGS = [
    (128, 128, 8, 2),
    (128, 64, 8, 3),
    (64, 64, 4, 4),
    (64, 64, 4, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 3),
]
SMALL_CONFIGS = [(16, 16, 4, 2), (32, 16, 4, 2)]


def case_flops(case: Case, shape: Shape) -> float:
    """QK^T + PV: the causal square of the chunk plus every query against the prefix."""
    causal = attention_prefill_flops(1, case.tokens, shape.heads, shape.head_dim)
    return causal + 4.0 * shape.head_dim * shape.heads * case.tokens * case.prefix


class Inputs:
    """One case's tensors: the cache holds the prefix and the chunk's k / v already (the
    engine stores them before it attends), in blocks scattered over the pool."""

    def __init__(self, case: Case, shape: Shape, device: torch.device, dtype: torch.dtype):
        torch.manual_seed(case.prefix * 7 + case.tokens)
        total = case.prefix + case.tokens
        blocks = -(-total // shape.block_size)
        pool = blocks + 8
        bs, hkv, d = shape.block_size, shape.kv_heads, shape.head_dim
        self.cache = torch.randn((2, pool, bs, hkv, d), dtype=dtype, device=device)
        order = torch.randperm(pool, device="cpu")[:blocks].to(device)
        self.block_table = order.view(1, blocks).to(torch.int32)
        position = torch.arange(total, device=device)
        slots = order[position // bs] * bs + position % bs
        flat = self.cache.view(2, pool * bs, hkv, d)
        new = slots[case.prefix :]
        qkv = torch.empty((case.tokens, shape.heads + 2 * hkv, d), dtype=dtype, device=device)
        qkv[:, : shape.heads].normal_()
        qkv[:, shape.heads : shape.heads + hkv] = flat[0, new]
        qkv[:, shape.heads + hkv :] = flat[1, new]
        self.q = qkv[:, : shape.heads]
        self.k = qkv[:, shape.heads : shape.heads + hkv]
        self.v = qkv[:, shape.heads + hkv :]
        self.query_start_loc = torch.tensor([0, case.tokens], device=device)
        self.seq_lens = torch.tensor([total], device=device)
        self.block_table_rows = torch.zeros(1, dtype=torch.int64, device=device)
        self.scale = d**-0.5
        self.keys = flat[0, slots]  # [total, Hkv, D] for the sdpa check
        self.values = flat[1, slots]

    def run(self, launch: AttentionLaunch) -> torch.Tensor:
        return paged_attention(
            self.q,
            self.cache,
            self.query_start_loc,
            self.seq_lens,
            self.block_table,
            self.scale,
            launch,
            block_table_rows=self.block_table_rows,
            k_new=self.k,
            v_new=self.v,
        )

    def sdpa(self) -> torch.Tensor | None:
        """torch's attention on contiguous tensors (prompts without a prefix only)."""
        if self.keys.shape[0] != self.q.shape[0]:
            return None
        q = self.q.transpose(0, 1).unsqueeze(0)
        k = self.keys.transpose(0, 1).unsqueeze(0)
        v = self.values.transpose(0, 1).unsqueeze(0)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
        )
        return out[0].transpose(0, 1)


def timed_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `repeats` calls (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def context_alive(device: torch.device) -> bool:
    try:
        sync(device)
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:  # a sticky CUDA error (illegal address, ...): nothing more runs
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU, interpreted)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--out", default=None, help="write the JSON result to this file")
    parser.add_argument(
        "--variants",
        default=",".join(PREFILL_VARIANTS),
        help=f"comma-separated variants (default: all): {', '.join(PREFILL_VARIANTS)}",
    )
    parser.add_argument(
        "--configs",
        type=int,
        default=None,
        help="use only the first N (block_m, block_n, warps, stages) configurations",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=160.0,
        help="start no new configuration after this many seconds (compiles included)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls a case")
    parser.add_argument(
        "--entry-timeout-s",
        type=float,
        default=60.0,
        help="a configuration still running after this long is reported as hung, and the "
        "sweep exits (a kernel that never returns cannot be interrupted otherwise)",
    )
    return parser.parse_args(argv)


def launches_in_rounds(
    variants: list[str], configs: list[tuple[int, int, int, int]], base: AttentionLaunch
) -> list[tuple[str, AttentionLaunch]]:
    """Every variant at the first configuration, then every variant at the second, ...;
    the warp-specialised ones (the likeliest to fail or hang) after all the others."""
    out = []
    for block_m, block_n, warps, stages in configs:
        for name in variants:
            launch = replace(
                base,
                block_m=block_m,
                block_n=block_n,
                num_warps=warps,
                num_stages=stages,
                **PREFILL_VARIANTS[name],
            )
            out.append((name, launch))
    return sorted(out, key=lambda entry: entry[1].warp_specialize)  # stable


def config_name(launch: AttentionLaunch) -> str:
    return f"m{launch.block_m}-n{launch.block_n}-w{launch.num_warps}-s{launch.num_stages}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    small = args.small or device.type == "cpu"
    shape = SMALL_SHAPE if small else FULL_SHAPE
    cases = SMALL_CASES if small else FULL_CASES
    configs = SMALL_CONFIGS if small else FULL_CONFIGS
    if args.configs is not None:
        configs = configs[: max(args.configs, 1)]
    repeats = args.repeats or (2 if small else 10)
    variants = [name for name in args.variants.split(",") if name]
    unknown = [name for name in variants if name not in PREFILL_VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}: use {', '.join(PREFILL_VARIANTS)}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    started = time.perf_counter()
    matmul = matmul_throughput(device, small)
    group = shape.heads // shape.kv_heads
    current = prefill_launch(dtype, max(case.tokens for case in cases), group, kernel="tiled")
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
        "shape": asdict(shape),
        "dtype": str(dtype),
        "matmul_flops_per_s": matmul,
        "reference": f"tiled {config_name(current)}: {current}",
        "cases": {case.name: {**asdict(case), "flops": case_flops(case, shape)} for case in cases},
        "sdpa": {},
        "results": [],
        "skipped": [],
    }
    inputs = {case.name: Inputs(case, shape, device, dtype) for case in cases}
    references = {}
    for case in cases:
        references[case.name] = inputs[case.name].run(current).float()
        try:
            sdpa_out = inputs[case.name].sdpa()
            if sdpa_out is not None:
                seconds_ms = timed_ms(inputs[case.name].sdpa, device, repeats)
                result["sdpa"][case.name] = {
                    "ms": seconds_ms,
                    "matmul_fraction": case_flops(case, shape) / (seconds_ms / 1e3) / matmul,
                    "tiled_max_abs_diff": (sdpa_out.float() - references[case.name])
                    .abs()
                    .max()
                    .item(),
                }
        except Exception as exc:  # informational only
            result["sdpa"][case.name] = {"error": str(exc)[-500:]}
    sync(device)
    print(
        f"matmul peak {matmul / 1e12:.1f} TFLOP/s; reference {result['reference']}; "
        f"set up in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    def finish() -> None:
        result["total_s"] = time.perf_counter() - started
        result["best"] = _best(result["results"], cases)
        if args.out:  # after every configuration: a killed sweep keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    running: dict = {}
    lock = threading.Lock()

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            with lock:
                entry = running.get("entry")
                if entry is None or time.perf_counter() - running["since"] < args.entry_timeout_s:
                    continue
                entry["status"] = f"hung: still running after {args.entry_timeout_s:.0f} s"
                result["results"].append(entry)
                finish()
                print_table(result, cases)
                sys.stdout.flush()
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    alive = True
    for name, launch in launches_in_rounds(variants, configs, current):
        entry = {"variant": name, "config": config_name(launch), "launch": str(launch)}
        elapsed = time.perf_counter() - started
        if not alive or elapsed > args.budget_s:
            entry["status"] = "skipped: CUDA context lost" if not alive else "skipped: budget"
            result["skipped"].append(entry)
            continue
        with lock:
            running.update(entry=entry, since=time.perf_counter())
        figures = measure(launch, cases, inputs, references, shape, matmul, device, repeats)
        alive = context_alive(device)
        with lock:
            running["entry"] = None
            entry.update(figures)
            result["results"].append(entry)
            finish()
        _print_entry(entry, cases)
    with lock:
        finish()
    print_table(result, cases)
    return 0


def measure(launch, cases, inputs, references, shape, matmul, device, repeats) -> dict:
    """Compile (first call), check every case against the reference, then time them."""
    entry: dict = {"status": "ok", "cases": {}}
    try:
        compile_started = time.perf_counter()
        inputs[cases[0].name].run(launch)
        sync(device)
        entry["first_call_s"] = time.perf_counter() - compile_started
        for case in cases:
            out = inputs[case.name].run(launch).float()
            reference = references[case.name]
            error = (out - reference).abs()
            diff = error.max().item()
            excess = (error - (ATOL + RTOL * reference.abs())).max().item()
            figures = {"max_abs_diff": diff, "tolerance_excess": excess}
            entry["cases"][case.name] = figures
            if not (math.isfinite(diff) and excess <= 0.0):
                entry["status"] = "wrong"
                continue
            ms = timed_ms(lambda case=case: inputs[case.name].run(launch), device, repeats)
            flops = case_flops(case, shape) / (ms / 1e3)
            figures.update(ms=ms, tflops=flops / 1e12, matmul_fraction=flops / matmul)
    except Exception as exc:  # a compile error, a launch refusal, a CUDA fault
        entry["status"] = "error"
        entry["error"] = "".join(traceback.format_exception_only(exc)).strip()[-2000:]
    return entry


def _best(results: list[dict], cases: list[Case]) -> dict:
    best = {}
    for case in cases:
        timed = [
            (entry["cases"][case.name]["matmul_fraction"], entry["variant"], entry["config"])
            for entry in results
            if entry["status"] == "ok" and "matmul_fraction" in entry["cases"].get(case.name, {})
        ]
        if timed:
            fraction, variant, config = max(timed)
            best[case.name] = {"variant": variant, "config": config, "matmul_fraction": fraction}
    return best


def _triton_version() -> str:
    import triton

    return triton.__version__


def _print_entry(entry: dict, cases: list[Case]) -> None:
    parts = [f"{entry['variant']:>22} {entry['config']:<16} {entry['status']:<6}"]
    if "first_call_s" in entry:
        parts.append(f"first {entry['first_call_s']:.1f}s")
    for case in cases:
        figures = entry["cases"].get(case.name, {})
        if "matmul_fraction" in figures:
            parts.append(f"{case.name} {100 * figures['matmul_fraction']:.1f}%")
        elif "max_abs_diff" in figures:
            parts.append(f"{case.name} diff {figures['max_abs_diff']:.3g}")
    if "error" in entry:
        parts.append(entry["error"].splitlines()[-1][:300])
    print("  ".join(parts), flush=True)


def print_table(result: dict, cases: list[Case]) -> None:
    key = cases[0].name

    def fraction(entry: dict) -> float:
        return entry["cases"].get(key, {}).get("matmul_fraction", -1.0)

    print(f"\nfraction of the bf16 matmul peak ({result['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s)")
    print(f"{'variant':>22} {'config':<16} " + " ".join(f"{case.name:>17}" for case in cases))
    for name, figures in result["sdpa"].items():
        if "matmul_fraction" not in figures:
            continue
        print(
            f"{'torch sdpa':>22} {'(contiguous)':<16} {name} "
            f"{100 * figures['matmul_fraction']:.1f}%"
        )
    for entry in sorted(result["results"], key=fraction, reverse=True):
        cells = []
        for case in cases:
            figures = entry["cases"].get(case.name, {})
            if "matmul_fraction" in figures:
                cells.append(f"{100 * figures['matmul_fraction']:16.1f}%")
            else:
                cells.append(f"{entry['status']:>17}")
        print(f"{entry['variant']:>22} {entry['config']:<16} " + " ".join(cells))
    if result["skipped"]:
        print(f"skipped: {len(result['skipped'])} ({result['skipped'][0]['status']})")
    print(f"best: {json.dumps(result['best'])}")
    print(f"total {result['total_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
