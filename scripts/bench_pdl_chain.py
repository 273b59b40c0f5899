#!/usr/bin/env python
"""Programmatic dependent launch on a decoder layer's kernel chain, on and off, side by side.

    python scripts/bench_pdl_chain.py --out pdl.json                  # CUDA, 8B shape
    TRITON_INTERPRET=1 python scripts/bench_pdl_chain.py --small --device cpu   # the flow

One 8B-shaped decoder layer without attention, as the engine's Triton layer ops run it at
decode: RMSNorm -> qkv -> RMSNorm of its first `hidden` columns (standing in for rotary +
attention, a small kernel) -> o -> residual add + RMSNorm -> gate_up -> SiLU-and-mul ->
down, over --layers sets of distinct weights (more bytes than the L2 holds, as a model's
layers are), captured in one CUDA graph and replayed, timed with events. The matmuls run
as cuBLAS (`cublas`), from the launch table (`table`: the skinny GEMM where the launch
table has a launch, else cuBLAS, on any GPU: the engine itself uses the table only on the
GPU model it was measured on, and runs the table's fused SiLU-and-down launches, which
this chain does not) or all four as the skinny GEMM (`skinny`: the table's
launch, else the heuristic's), each with PPRUNTIME_PDL=0 and =1 in turn, rounds
alternating. Prints microseconds a layer, the weights' bytes over the copy bandwidth, and
each choice's PDL-on over PDL-off time; checks that PDL on and off give the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import copy_bandwidth

from ppruntime.config import DEPENDENT_LAUNCH_ENV
from ppruntime.kernels import skinny_gemm as sg
from ppruntime.kernels.activation import silu_and_mul
from ppruntime.kernels.dependent_launch import pdl_enabled
from ppruntime.kernels.rms_norm import fused_add_rms_norm, rms_norm

SHAPES = {"8b": (4096, 6144, 14336), "small": (64, 128, 192)}  # hidden, qkv width, inter
CHOICES = ("cublas", "table", "skinny")
PROJECTIONS = ("qkv", "o", "gate_up", "down")


class LayerChain:
    def __init__(self, shape: str, m: int, layers: int, dtype, device) -> None:
        self.hidden, qkv, inter = SHAPES[shape]
        generator = torch.Generator(device=device).manual_seed(0)

        def weight(n: int, k: int) -> torch.Tensor:
            w = torch.randn(n, k, device=device, dtype=dtype, generator=generator)
            return w * k**-0.5

        dims = {"qkv": (qkv, self.hidden), "o": (self.hidden, self.hidden)}
        dims |= {"gate_up": (2 * inter, self.hidden), "down": (self.hidden, inter)}
        self.layers = [{name: weight(*dims[name]) for name in PROJECTIONS} for _ in range(layers)]
        self.norm = torch.ones(self.hidden, device=device, dtype=dtype)
        self.x = torch.randn(m, self.hidden, device=device, dtype=dtype, generator=generator)
        self.weight_bytes = sum(
            w.numel() * w.element_size() for lw in self.layers for w in lw.values()
        )
        self.launches = {
            choice: {name: self._launch(choice, m, *dims[name], dtype) for name in PROJECTIONS}
            for choice in CHOICES
        }

    @staticmethod
    def _launch(choice: str, m: int, n: int, k: int, dtype) -> sg.SkinnyConfig | None:
        if choice == "cublas":
            return None
        config = sg.skinny_config(m, n, k, dtype, measured_only=True)
        if config is None and choice == "skinny":
            config = sg.heuristic_config(m, n, k, dtype)
        return config

    def forward(self, choice: str) -> torch.Tensor:
        launches = self.launches[choice]

        def linear(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
            config = launches[name]
            return F.linear(x, w) if config is None else sg.skinny_gemm(x, w, None, config)

        h = residual = self.x
        for lw in self.layers:
            qkv = linear(rms_norm(h, self.norm, 1e-5), lw["qkv"], "qkv")
            attended = rms_norm(qkv[:, : self.hidden], self.norm, 1e-5)
            normed, residual = fused_add_rms_norm(
                linear(attended, lw["o"], "o"), residual, self.norm, 1e-5
            )
            h = linear(silu_and_mul(linear(normed, lw["gate_up"], "gate_up")), lw["down"], "down")
        return h


def replayed_ms(fn, reps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Median milliseconds of a CUDA graph replay of fn, and its output (eager off CUDA)."""
    if device.type != "cuda":
        start = time.perf_counter()
        out = fn()
        return (time.perf_counter() - start) * 1000, out
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times), out.clone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="64,16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--small", action="store_true", help="tiny shapes, one layer (CPU flow)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape, layers = ("small", 1) if args.small else ("8b", args.layers)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    bandwidth = copy_bandwidth(device, small=False) if device.type == "cuda" else None
    report = {"device": str(device), "copy_bandwidth": bandwidth, "shape": shape, "cases": []}
    before = os.environ.get(DEPENDENT_LAUNCH_ENV)
    try:
        for m in [int(b) for b in args.batches.split(",")]:
            chain = LayerChain(shape, m, layers, dtype, device)
            times: dict[tuple[str, bool], list[float]] = {}
            outputs: dict[tuple[str, bool], torch.Tensor] = {}
            for round_index in range(args.rounds):
                for choice in CHOICES:
                    order = (False, True) if round_index % 2 == 0 else (True, False)
                    for pdl in order:
                        os.environ[DEPENDENT_LAUNCH_ENV] = "1" if pdl else "0"
                        ms, out = replayed_ms(
                            lambda c=choice, n=chain: n.forward(c), args.reps, device
                        )
                        times.setdefault((choice, pdl), []).append(ms)
                        outputs[(choice, pdl)] = out
            for choice in CHOICES:
                same_bits = torch.equal(outputs[(choice, True)], outputs[(choice, False)])
                row = {"batch": m, "choice": choice, "same_bits": same_bits}
                os.environ[DEPENDENT_LAUNCH_ENV] = "1"
                row["pdl_active"] = pdl_enabled(device)  # False off Hopper: on = off there
                for pdl in (False, True):
                    us = statistics.median(times[(choice, pdl)]) * 1000 / layers
                    key = "pdl" if pdl else "plain"
                    row[f"{key}_us_per_layer"] = us
                    if bandwidth:
                        row[f"{key}_bandwidth_fraction"] = (
                            chain.weight_bytes / layers / (us * 1e-6) / bandwidth
                        )
                row["pdl_over_plain"] = row["pdl_us_per_layer"] / row["plain_us_per_layer"]
                report["cases"].append(row)
                fractions = ""
                if bandwidth:
                    plain, pdl = row["plain_bandwidth_fraction"], row["pdl_bandwidth_fraction"]
                    fractions = f" ({plain:.1%} -> {pdl:.1%} of the copy bandwidth)"
                print(
                    f"batch {m:>3} {choice:<7} plain {row['plain_us_per_layer']:8.2f} us/layer, "
                    f"PDL {row['pdl_us_per_layer']:8.2f}: PDL / plain {row['pdl_over_plain']:.3f}"
                    f"{fractions}; same bits: {same_bits}",
                    flush=True,
                )
                if not same_bits:
                    raise SystemExit(f"batch {m} {choice}: PDL on and off differ")
    finally:
        if before is None:
            os.environ.pop(DEPENDENT_LAUNCH_ENV, None)
        else:
            os.environ[DEPENDENT_LAUNCH_ENV] = before
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
