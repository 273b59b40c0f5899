"""Decode-batch matmuls: which weight layout lets cuBLAS read the weights fastest.

    python scripts/sweep_decode_matmul.py --out sweep_matmul.json     # CUDA, ~1 min
    python scripts/sweep_decode_matmul.py --small --device cpu        # the flow

For each projection of the 1B and 8B models (merged qkv, o, merged gate_up, down, LM
head) at decode batches 1..128, it times, replayed from a CUDA graph (no launch cost):
`F.linear(x, W)` with W [N, K] as checkpoints store it (what ppruntime runs today),
`x @ Wt` with Wt [K, N] contiguous, and `F.linear` under cuBLASLt's heuristics
(`torch.backends.cuda.preferred_blas_library("cublaslt")`), and reports the weight bytes
over the device copy bandwidth measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
from _bench_models import replayed_seconds
from profile_decode import projection_shapes


def sweep(args, device: torch.device) -> dict:
    bandwidth = bench_gpu.copy_bandwidth(device, args.small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = ["small"] if args.small else ["1b", "8b"]
    batches = [1, 4] if args.small else [1, 16, 64, 128]
    result = {"copy_bandwidth": bandwidth, "shapes": {}}
    for shape_name in shapes:
        rows = {}
        for name, (out_features, in_features) in projection_shapes(
            bench_gpu.SHAPES[shape_name]
        ).items():
            weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.02
            weight_t = weight.t().contiguous()
            weight_bytes = weight.numel() * weight.element_size()
            for batch in batches:
                x = torch.randn(batch, in_features, device=device, dtype=dtype)
                variants = {
                    "linear": lambda x=x, w=weight: F.linear(x, w),
                    "mm_kn": lambda x=x, w=weight_t: torch.mm(x, w),
                }
                reference = variants["linear"]().float()
                row = {}
                for variant, fn in variants.items():
                    diff = (fn().float() - reference).abs().max().item()
                    seconds = replayed_seconds(fn, args.calls, device)
                    row[variant] = {
                        "us": seconds * 1e6,
                        "bandwidth_fraction": weight_bytes / seconds / bandwidth,
                        "max_abs_diff": diff,
                    }
                if device.type == "cuda" and hasattr(torch.backends.cuda, "preferred_blas_library"):
                    previous = torch.backends.cuda.preferred_blas_library()
                    try:
                        torch.backends.cuda.preferred_blas_library("cublaslt")
                        seconds = replayed_seconds(variants["linear"], args.calls, device)
                        row["linear_cublaslt"] = {
                            "us": seconds * 1e6,
                            "bandwidth_fraction": weight_bytes / seconds / bandwidth,
                        }
                    except Exception as exc:  # reported, not fatal
                        row["linear_cublaslt"] = {"error": str(exc)[:200]}
                    finally:
                        torch.backends.cuda.preferred_blas_library(previous)
                rows[f"{name}-b{batch}"] = row
                line = ", ".join(
                    f"{variant} {figures['us']:.1f} us ({figures['bandwidth_fraction']:.0%})"
                    for variant, figures in row.items()
                    if "us" in figures
                )
                print(f"{shape_name} {name} [{batch}x{in_features}x{out_features}]: {line}")
            weight = weight_t = None
        result["shapes"][shape_name] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = sweep(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
