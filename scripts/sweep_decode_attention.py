"""Sweep the Triton decode-attention launch: split floor and tiles, as a graph replays it.

    python scripts/sweep_decode_attention.py --out sweep_decode.json     # CUDA, ~5 min
    python scripts/sweep_decode_attention.py --shapes 8b --out 8b.json   # one shape
    TRITON_INTERPRET=1 python scripts/sweep_decode_attention.py --small  # the flow, CPU

A decode launch is fixed when a CUDA graph is captured, for the longest context the
engine allows (`--max-context`), while the contexts it then runs are mostly shorter.
For each attention shape (the 1B and 8B models') and each decode batch it times
`paged_attention` for the launch `decode_launch` picks, and for variants of it (the
fewest keys a split takes, BLOCK_N, warps, stages), each replayed from a CUDA graph of
`--calls` back-to-back launches (no host launch cost in the time), and reports the KV
bytes read over the device copy bandwidth measured in the same process. Every
variant's output is checked against the default launch's. Each launch also stores the
step's k / v (`slot_mapping`), as the triton backend's decode step runs it; the k / v
are what the cache already holds at those slots, so every call reads the same cache.
The variants store k / v as the triton backend does by default (`store_kv`, then the
attention launch); with `--fused-store` they are fused-store launches (the attention
launch writes k / v itself, as with PPRUNTIME_FUSED_KV_STORE=1). Beside the variants,
two baselines of the default launch: "other-store" (the other way of storing: fused when
the variants are not, store_kv + attention when they are) and "no-store" (attention
alone: what storing adds). The JSON is rewritten after every case, so a run cut short
keeps what it measured (`"complete": false` until the last case).

On the H200 (2026-12-01) the fused store measured 7-33 % slower than store_kv + attention
at 1B (docs/benchmarks.md, "Late runs on the H200").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu
from _bench_models import replayed_seconds

from ppruntime.kernels.kv_store import store_kv
from ppruntime.kernels.paged_attention import (
    AttentionLaunch,
    decode_launch,
    paged_attention,
)
from ppruntime.model.backends.triton_backend import _target_programs


@dataclass(frozen=True)
class AttentionShape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    shape.name: shape
    for shape in (AttentionShape("1b", 32, 8, 64), AttentionShape("8b", 32, 8, 128))
}
SMALL_SHAPES = [AttentionShape("small", 4, 2, 16)]
# (batch, context): the bench_gpu cases' contexts, then long ones
CASES = [(64, 192), (64, 288), (64, 512), (64, 1024), (64, 4096), (16, 4032), (1, 4096)]
SMALL_CASES = [(4, 24), (2, 80)]


def variants(default: AttentionLaunch, small: bool) -> dict[str, AttentionLaunch]:
    found = {"default": default}
    for floor in (0, 128, 256, 512, 1024) if not small else (0, 32):
        found[f"floor{floor}"] = replace(default, min_split_keys=floor)
    for block_n in (32, 64, 128) if not small else (16,):
        for warps in (2, 4) if not small else (4,):
            for stages in (2, 3, 4) if not small else (2,):
                found[f"n{block_n}-w{warps}-s{stages}"] = replace(
                    default, block_n=block_n, num_warps=warps, num_stages=stages
                )
    found["single-split"] = replace(default, num_splits=1, min_split_keys=0)
    for block_n, warps, stages in ((64, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2)):
        found[f"single-n{block_n}-w{warps}-s{stages}"] = replace(
            default,
            num_splits=1,
            min_split_keys=0,
            block_n=block_n,
            num_warps=warps,
            num_stages=stages,
        )
    return found


def decode_inputs(shape: AttentionShape, batch: int, context: int, block_size: int, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    generator = torch.Generator().manual_seed(batch * 100003 + context)
    cache = torch.randn(
        (2, num_blocks, block_size, shape.kv_heads, shape.head_dim), generator=generator
    ).to(device=device, dtype=dtype)
    order = torch.randperm(num_blocks - 1, generator=generator).to(device)  # scattered
    table = order.view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, shape.q_heads, shape.head_dim, generator=generator)
    last = context - 1  # the new token's position
    slots = table[:, last // block_size].to(torch.int64) * block_size + last % block_size
    flat = cache.view(2, num_blocks * block_size, shape.kv_heads, shape.head_dim)
    return {
        "q": q.to(device=device, dtype=dtype),
        "layer_cache": cache,
        "query_start_loc": torch.arange(batch + 1, device=device, dtype=torch.int32),
        "seq_lens": torch.full((batch,), context, device=device, dtype=torch.int32),
        "block_table": table,
        "scale": shape.head_dim**-0.5,
        "k_new": flat[0, slots].clone(),
        "v_new": flat[1, slots].clone(),
        "slot_mapping": slots,
    }


def calls(default: AttentionLaunch, inputs: dict, small: bool) -> dict[str, object]:
    """name -> a call to time: each launch variant (storing k / v as the launch says: fused,
    or store_kv first), then the baselines."""
    unfused = {k: v for k, v in inputs.items() if k not in ("k_new", "v_new", "slot_mapping")}

    def storing(launch: AttentionLaunch):
        if launch.fused_store:
            return lambda: paged_attention(launch=launch, **inputs)

        def store_then_attend():
            store_kv(
                inputs["k_new"], inputs["v_new"], inputs["layer_cache"], inputs["slot_mapping"]
            )
            return paged_attention(launch=launch, **unfused)

        return store_then_attend

    found = {name: storing(launch) for name, launch in variants(default, small).items()}
    found["other-store"] = storing(replace(default, fused_store=not default.fused_store))
    attention_only = replace(default, fused_store=False)
    found["no-store"] = lambda: paged_attention(launch=attention_only, **unfused)
    return found


BASELINES = ("other-store", "no-store")


def sweep(args, device) -> dict:
    bandwidth = bench_gpu.copy_bandwidth(device, args.small)
    target = _target_programs(device)  # the triton backend's own
    result = {
        "copy_bandwidth": bandwidth,
        "max_context": args.max_context,
        "fused_store": args.fused_store,
        "complete": False,
        "shapes": {},
    }
    element = 2 if device.type == "cuda" else 4
    shapes = SMALL_SHAPES if args.small else [SHAPES[name] for name in args.shapes.split(",")]
    for shape in shapes:
        rows = result["shapes"].setdefault(shape.name, {})
        for batch, context in SMALL_CASES if args.small else CASES:
            inputs = decode_inputs(shape, batch, context, args.block_size, device)
            default = decode_launch(
                batch,
                shape.kv_heads,
                args.max_context,
                target,
                head_dim=shape.head_dim,
                fused_store=args.fused_store,
            )
            timed_calls = calls(default, inputs, args.small)
            expected = timed_calls["default"]().float()
            kv_bytes = batch * context * 2 * shape.kv_heads * shape.head_dim * element
            case = {"default_launch": asdict(default)}
            for name, call in timed_calls.items():
                try:
                    out = call().float()
                    diff = (out - expected).abs().max().item()
                    seconds = replayed_seconds(call, args.calls, device)
                except Exception as exc:  # a variant that fails is reported, not fatal
                    case[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    continue
                case[name] = {
                    "us": seconds * 1e6,
                    "kv_bandwidth_fraction": kv_bytes / seconds / bandwidth,
                    "max_abs_diff": diff,
                }
            rows[f"b{batch}-ctx{context}"] = case
            timed = [k for k in case if isinstance(case[k], dict) and "us" in case[k]]
            best = min((k for k in timed if k not in BASELINES), key=lambda k: case[k]["us"])
            baselines = "".join(f", {k} {case[k]['us']:.1f} us" for k in BASELINES if k in timed)
            print(
                f"{shape.name} b{batch} ctx{context}: default "
                f"{case['default']['us']:.1f} us ({case['default']['kv_bandwidth_fraction']:.0%})"
                f", best {best} {case[best]['us']:.1f} us "
                f"({case[best]['kv_bandwidth_fraction']:.0%}){baselines}",
                flush=True,
            )
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1))
    result["complete"] = True
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma list of 1b, 8b")
    parser.add_argument(
        "--fused-store",
        action="store_true",
        help="the variants store k / v inside the attention launch (default: store_kv "
        "first, as the triton backend does by default)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.small:
        args.max_context = min(args.max_context, 128)
        args.block_size = min(args.block_size, 8)
    result = sweep(args, device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
