"""Where a GPU decode step's time goes: kernels by category, and the host's functions.

    python scripts/profile_decode.py --cases 1b-decode,8b-decode --out-dir prof/
    python scripts/profile_decode.py --small --device cpu --out-dir /tmp/prof   # the flow

For each case of scripts/bench_gpu.py it builds the same random checkpoint, loads it
with `LLM(...)`, and profiles `steps` decode steps (generate(n) minus generate(1)):

- GPU: every kernel's time from the CUDA profiler (kernels replayed from CUDA graphs
  included), summed by name and by category (matmul, attention, norm, rotary,
  activation, sampling, copies, other), per decode step;
- the matmuls alone: each decoder-layer projection's shape at the case's batch, timed
  by itself with F.linear, as a fraction of the copy bandwidth its weight bytes need;
- host: cProfile of the same decode steps, the functions with the most own time and the
  most cumulative time, per step.

Writes `<case>.json` and `<case>-host.txt` to --out-dir and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu

from ppruntime import LLM, SamplingParams

CATEGORIES = (
    ("attention", ("paged_attention", "merge_splits", "attention", "flash", "sdpa")),
    ("kv-store", ("kv_store", "store_kv")),
    ("norm", ("rms_norm", "rmsnorm", "layer_norm")),
    ("rotary", ("rotary", "rope")),
    ("activation", ("silu", "act_and_mul", "activation")),
    ("sampling", ("sampl", "gumbel", "argmax", "topk", "sort", "softmax", "log_softmax")),
    ("matmul", ("gemm", "gemv", "cutlass", "cublas", "sm90_xmma", "nvjet", "matmul", "splitk")),
    ("copy", ("memcpy", "memset", "copy", "fill", "cat", "index", "gather", "scatter")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def kernel_times(generate, steps: int, device: torch.device) -> dict:
    """Per-step kernel time by name and category: profile(n+1) minus profile(1)."""
    from torch.profiler import ProfilerActivity, profile

    def profiled(n: int) -> dict[str, tuple[float, int]]:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(n)
            torch.cuda.synchronize(device)
        totals: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for event in prof.events():
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            totals[event.name][0] += (
                event.device_time_total
                if hasattr(event, "device_time_total")
                else event.cuda_time_total
            )
            totals[event.name][1] += 1
        return {name: (us, count) for name, (us, count) in totals.items()}

    one = profiled(1)
    many = profiled(steps + 1)
    by_name = {}
    for name, (us, count) in many.items():
        base_us, base_count = one.get(name, (0.0, 0))
        per_step_us = (us - base_us) / steps
        if per_step_us > 0.5:
            by_name[name] = {
                "us_per_step": per_step_us,
                "calls_per_step": (count - base_count) / steps,
                "category": category(name),
            }
    by_category: dict[str, float] = defaultdict(float)
    for row in by_name.values():
        by_category[row["category"]] += row["us_per_step"]
    ordered = dict(sorted(by_name.items(), key=lambda item: -item[1]["us_per_step"]))
    return {
        "kernels": dict(list(ordered.items())[:60]),
        "by_category_us_per_step": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "total_kernel_us_per_step": sum(by_category.values()),
    }


def projection_shapes(shape: bench_gpu.Shape) -> dict[str, tuple[int, int]]:
    """(out, in) of each matmul of one layer as ppruntime runs it (merged qkv, gate_up)."""
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    return {
        "qkv": (q + 2 * kv, shape.hidden_size),
        "o": (shape.hidden_size, q),
        "gate_up": (2 * shape.intermediate_size, shape.hidden_size),
        "down": (shape.hidden_size, shape.intermediate_size),
        "lm_head": (shape.vocab_size, shape.hidden_size),
    }


def matmul_alone(shape: bench_gpu.Shape, batch: int, device, bandwidth: float) -> dict:
    """Each projection timed alone at the decode batch: weight bytes / time / bandwidth."""
    timer = bench_gpu.Timer(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = {}
    for name, (out_features, in_features) in projection_shapes(shape).items():
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
        x = torch.randn(batch, in_features, device=device, dtype=dtype)
        seconds = bench_gpu.time_op(lambda x=x, weight=weight: F.linear(x, weight), timer, 50)
        weight_bytes = weight.numel() * weight.element_size()
        rows[name] = {
            "shape": [batch, in_features, out_features],
            "us": seconds * 1e6,
            "bandwidth_fraction": weight_bytes / seconds / bandwidth,
        }
        del weight, x
    return rows


def host_profile(generate, steps: int) -> tuple[str, dict]:
    profiler = cProfile.Profile()
    generate(1)
    started = time.perf_counter()
    profiler.enable()
    generate(steps + 1)
    profiler.disable()
    wall = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"# {steps + 1} tokens, wall {wall:.3f} s under cProfile\n\n## own time\n")
    stats.sort_stats("tottime").print_stats(45)
    text.write("\n## cumulative\n")
    stats.sort_stats("cumulative").print_stats(60)
    return text.getvalue(), {"cprofile_wall_s": wall}


def profile_case(case, checkpoint: Path, args, device, bandwidth: float) -> dict:
    kwargs = bench_gpu.engine_kwargs([case], args.block_size, None)
    llm = LLM(model=str(checkpoint), dtype="bfloat16", device=device.type, **kwargs)
    prompts = list(bench_gpu.prompts_for(case, llm.vocab_size))

    def generate(n: int) -> None:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)

    steps = min(args.steps, case.new_tokens)
    result: dict = {"case": case.name, "steps": steps}
    try:
        generate(2)
        timer = bench_gpu.Timer(device)
        with timer() as one:
            generate(1)
        with timer() as many:
            generate(steps + 1)
        result["decode_step_ms"] = (many["s"] - one["s"]) / steps * 1e3
        if device.type == "cuda":
            result.update(kernel_times(generate, steps, device))
        host_text, host = host_profile(generate, steps)
        result.update(host)
        (args.out_dir / f"{case.name}-host.txt").write_text(host_text)
    finally:
        llm.shutdown()
        llm = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["matmul_alone"] = matmul_alone(
        bench_gpu.SHAPES[case.shape], case.batch, device, bandwidth
    )
    return result


def summary(result: dict) -> str:
    lines = [f"== {result['case']}: decode step {result['decode_step_ms']:.3f} ms"]
    if "total_kernel_us_per_step" in result:
        lines.append(f"kernels: {result['total_kernel_us_per_step']:.0f} us/step")
        for label, us in result["by_category_us_per_step"].items():
            lines.append(f"  {label:<11} {us:8.1f} us")
        for name, row in list(result["kernels"].items())[:15]:
            lines.append(
                f"  {row['us_per_step']:8.1f} us x{row['calls_per_step']:.0f} {name[:100]}"
            )
    for name, row in result["matmul_alone"].items():
        lines.append(
            f"  matmul {name:<8} {row['shape']} {row['us']:.1f} us, "
            f"{row['bandwidth_fraction']:.1%} of copy bandwidth"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1b-decode,8b-decode")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out-dir", type=Path, default=Path("prof"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    cases = bench_gpu.SMALL_CASES if args.small else bench_gpu.CASES
    names = list(cases) if args.small else args.cases.split(",")
    bandwidth = bench_gpu.copy_bandwidth(device, args.small)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            case = cases[name]
            checkpoint = bench_gpu.write_checkpoint(
                bench_gpu.SHAPES[case.shape], Path(workdir) / case.shape, device
            )
            result = profile_case(case, checkpoint, args, device, bandwidth)
            result["copy_bandwidth"] = bandwidth
            (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
            print(summary(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
