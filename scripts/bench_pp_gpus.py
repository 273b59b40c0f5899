#!/usr/bin/env python
"""Pipeline parallelism across the GPUs of one machine (issue 15): PP = 1, 2, 4.

    python scripts/bench_pp_gpus.py --out pp.json --png pp4.png           # every GPU here
    python scripts/bench_pp_gpus.py --channels nccl,host --out pp.json    # + the host channel
    python scripts/bench_pp_gpus.py --gpus 1 --channels host ...          # one GPU: PP=2 shares it
    python scripts/bench_pp_gpus.py --device cpu --small --out x.json     # CPU dry run, seconds

On a machine with G GPUs it writes random bf16 checkpoints (transformers' tensor
names, no download) of the Llama-3.1-8B shape, and of the Llama-3.1-70B shape with
its layers cut so that its weights plus the KV cache of the load do not fit one GPU
but its stages fit (the layer count is computed from the GPU's memory and printed).
Each run is its own MPI job (`mpirun -n PP python this --worker`, one rank per GPU,
`--activation-channel` as asked; PP=1 has none), back to back in one invocation:
8B at PP = 1, 2, 4 (as G allows), 70B-cut at PP >= 2. Every run generates the same
saturating load (default 256 requests of 512 prompt + 256 new tokens, greedy,
ignore_eos) after a short warm-up, with `--trace` on. Reported per run:

- output tokens/s and TTFT / TPOT p50 and p99;
- per rank, from the trace's device spans (ppruntime/stage/device_spans.py: on CUDA
  the GPU's own timestamps) inside the timed window: busy fraction (their union over
  the window) and bubble (1 - busy), and the host's time in each span kind;
- efficiency = tput(PP=N) / (N x tput(PP=1)) (70B-cut: relative to its smallest PP);
- per stage, its mean decode step (forward + sampling on the last stage) over its HBM
  roofline: (its weight bytes + the KV bytes its decode microbatches read) / the
  device copy bandwidth measured in the same job;
- with several channels, tput(host) / tput(nccl) at each PP (the channel's share).

--weak-scaling gives PP=N N times the requests (microbatches as large as PP=1's batch).
The JSON goes to --out (after every run; a failed run is named there and the others
still run), a table is printed last, and the timeline of the largest PP run (8B,
first channel) is drawn to --png, with a zoom on its steady decode beside.
--time-budget-s bounds how long the invocation goes on starting runs.
Environment: MPIRUN (the mpirun to use), PYTHON (the ranks' interpreter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common
from _bench_models import SHAPES, Shape

from ppruntime.stage.device_spans import DECODE_SPAN, DEVICE_SPANS

SCRIPT = os.path.abspath(__file__)
HOST_COMPUTE_SPANS = ("forward", "sample")
STAGE_FILL = 0.9  # a stage must fit in this share of one GPU's memory
OVERFLOW = 1.1  # the 70B-cut's weights + KV exceed one GPU's memory by this factor
TARGETS = {"efficiency_pp2": 0.95, "efficiency_pp4": 0.90, "roofline_70b": 0.70}


# ----------------------------------------------------------------------------------------
# what runs: the load, the machine, the plan
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    num_requests: int
    input_len: int
    output_len: int
    max_batch_size: int  # 0: each run's ceil(requests / PP), the microbatch it schedules
    max_num_tokens: int
    block_size: int

    @property
    def kv_tokens(self) -> int:
        """KV positions the cache holds when every request is at its full length."""
        return self.num_requests * (self.input_len + self.output_len)

    @property
    def kv_blocks(self) -> int:
        per_request = -(-(self.input_len + self.output_len) // self.block_size)
        return self.num_requests * per_request + 16

    def for_run(self, pp: int, weak_scaling: bool) -> Load:
        """This load at PP=pp: as many requests (strong scaling) or pp times as many
        (weak: every microbatch as large as PP=1's)."""
        requests = self.num_requests * (pp if weak_scaling else 1)
        batch = self.max_batch_size or -(-requests // pp)
        return replace(self, num_requests=requests, max_batch_size=batch)


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda" or "cpu"
    gpus: int  # devices the runs use (CPU: the pretend count)
    memory_bytes: int  # one device's memory (CPU --small: a pretend size)
    name: str


@dataclass(frozen=True)
class Run:
    shape_key: str  # "8b" or "70b" (or their small stand-ins)
    shape: Shape
    pp: int
    channel: str  # "-" at PP=1
    load: Load  # this run's (Load.for_run)

    @property
    def label(self) -> str:
        return f"{self.shape_key}-pp{self.pp}-{self.channel}"


def load_from(args) -> Load:
    return Load(
        args.num_requests,
        args.input_len,
        args.output_len,
        args.max_batch_size or 0,
        args.max_num_tokens,
        args.block_size,
    )


def probe_machine(args) -> Machine:
    """The devices, as the ranks will see them (asked in a child: the driver holds no GPU)."""
    if args.device == "cpu":
        return Machine("cpu", max(args.pp_sizes), 0, "cpu")
    code = (
        "import json, torch\n"
        "n = torch.cuda.device_count()\n"
        "p = torch.cuda.get_device_properties(0) if n else None\n"
        "print(json.dumps([n, p.total_memory if p else 0, p.name if p else '']))\n"
    )
    out = subprocess.run(
        [worker_python(), "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    count, memory, name = json.loads(out.stdout.strip().splitlines()[-1])
    if count == 0:
        raise SystemExit("no GPU visible: use --device cpu (with --small for a dry run)")
    gpus = args.gpus or count
    if gpus > count:
        raise SystemExit(f"--gpus {gpus} but this machine has {count} GPU(s)")
    return Machine("cuda", gpus, memory, name)


def check_channels(channels: list[str], machine: Machine, pp_sizes: list[int]) -> None:
    """Refuse what cannot run, before any checkpoint is written."""
    biggest = max(pp_sizes)
    if machine.device == "cpu":
        bad = [c for c in channels if c not in ("host", "gloo")]
        if bad:
            raise SystemExit(f"--channels {','.join(bad)} on the CPU: use host and/or gloo")
        return
    if "gloo" in channels:
        raise SystemExit("--channels gloo moves CPU tensors: on GPUs use nccl and/or host")
    if "nccl" in channels and biggest > machine.gpus:
        fitting = ",".join(str(p) for p in pp_sizes if p <= machine.gpus)
        raise SystemExit(
            f"--channels nccl cannot run PP={biggest} on {machine.gpus} GPU(s): ranks would "
            "share a GPU and NCCL refuses two ranks on one GPU; use --channels host "
            f"(ranks sharing GPUs) or --pp {fitting}"
        )


def cut_layers(shape: Shape, machine: Machine, load: Load, element_bytes: int) -> dict:
    """The fewest layers whose weights + KV of the load exceed one device's memory by
    OVERFLOW (fewest: the checkpoint is written and read at every run), at most the
    shape's own; and whether a stage of PP=2 still fits one device."""
    per_layer = (shape.layer_params + 2 * shape.hidden_size) * element_bytes
    per_layer += shape.kv_bytes_per_token_layer(element_bytes) * load.kv_tokens
    fixed = shape.with_layers(1).checkpoint_bytes(element_bytes) - (
        (shape.layer_params + 2 * shape.hidden_size) * element_bytes
    )
    wanted = math.ceil((OVERFLOW * machine.memory_bytes - fixed) / per_layer)
    layers = max(2, min(wanted, shape.num_hidden_layers))
    total = fixed + layers * per_layer
    return {
        "layers": layers,
        "bytes_per_layer_with_kv": per_layer,
        "weights_and_kv_bytes": total,
        "device_memory_bytes": machine.memory_bytes,
        "fits_one_device": total <= machine.memory_bytes,
        "largest_stage_bytes_pp2": fixed / 2 + math.ceil(layers / 2) * per_layer,
    }


def plan_runs(args, machine: Machine, load: Load) -> tuple[list[Run], dict]:
    """The runs in order, and what was decided about the 70B-cut shape (printed)."""
    base_key, big_key = ("small", "small-70b") if args.small else ("8b", "70b")
    runs: list[Run] = []
    notes: dict = {}
    pp_sizes = args.pp_sizes
    if "8b" in args.shapes:
        runs += runs_of(base_key, SHAPES[base_key], pp_sizes, args, load)
    if "70b" in args.shapes:
        shape, notes = big_shape(args, machine, load, SHAPES[big_key])
        if shape is not None:
            big_pp = [p for p in pp_sizes if p >= 2 or args.layers_70b]
            big = runs_of(big_key, shape, big_pp, args, load)
            element = element_bytes(args, machine)
            fits = [r for r in big if stage_fits(r, machine, element) or args.layers_70b]
            skipped = sorted({r.pp for r in big} - {r.pp for r in fits})
            if skipped:
                notes["skipped_pp"] = skipped  # a stage of that PP would not fit one device
            runs += fits
    return runs, notes


def runs_of(key: str, shape: Shape, pp_sizes, args, load: Load) -> list[Run]:
    runs = []
    for pp in pp_sizes:
        run_load = load.for_run(pp, args.weak_scaling)
        for channel in ["-"] if pp == 1 else args.channels:
            runs.append(Run(key, shape, pp, channel, run_load))
    return runs


def stage_fits(run: Run, machine: Machine, element: int) -> bool:
    """The largest stage of this run (its share of the layers with their KV, plus the
    embedding or the head) within STAGE_FILL of one device's memory."""
    shape = run.shape
    per_layer = (shape.layer_params + 2 * shape.hidden_size) * element
    per_layer += shape.kv_bytes_per_token_layer(element) * run.load.kv_tokens
    layers = -(-shape.num_hidden_layers // run.pp)
    ends = shape.vocab_size * shape.hidden_size * element * (1 if run.pp > 1 else 2)
    return layers * per_layer + ends <= STAGE_FILL * machine.memory_bytes


def big_shape(args, machine: Machine, load: Load, shape: Shape) -> tuple[Shape | None, dict]:
    element = element_bytes(args, machine)
    if args.layers_70b:
        layers = args.layers_70b
        notes = {"layers": layers, "why": "--layers-70b (a dry run: no memory rule applied)"}
        return shape.with_layers(layers), notes
    cut = cut_layers(shape, machine, load, element)
    if machine.gpus < 2:
        cut["why"] = "skipped: one device cannot hold a model that does not fit one device"
        return None, cut
    if cut["largest_stage_bytes_pp2"] > STAGE_FILL * machine.memory_bytes:
        cut["why"] = "skipped: a PP=2 stage would not fit one device (lower the load)"
        return None, cut
    cut["why"] = (
        f"weights + KV of {load.kv_tokens} tokens = {gib(cut['weights_and_kv_bytes'])} "
        f"{'<=' if cut['fits_one_device'] else '>'} one device's {gib(machine.memory_bytes)}; "
        f"largest PP=2 stage {gib(cut['largest_stage_bytes_pp2'])}"
    )
    return shape.with_layers(cut["layers"]), cut


def element_bytes(args, machine: Machine) -> int:
    return 2 if run_dtype(args, machine) in ("bfloat16", "float16") else 4


def run_dtype(args, machine: Machine) -> str:
    return args.dtype or ("bfloat16" if machine.device == "cuda" else "float32")


def worker_python() -> str:
    return os.environ.get("PYTHON") or sys.executable


# ----------------------------------------------------------------------------------------
# worker: one run, under mpirun, one rank per stage
# ----------------------------------------------------------------------------------------
def worker(args) -> None:
    common.one_torch_thread()
    import numpy as np

    from ppruntime import LLM, SamplingParams

    load = load_from(args)
    started = time.time()
    llm = LLM(
        model=args.model,
        pp_size=args.pp,
        device=args.device,
        dtype=args.dtype,
        activation_channel=args.channel if args.pp > 1 else "auto",
        max_batch_size=load.max_batch_size,
        max_num_tokens=load.max_num_tokens,
        block_size=load.block_size,
        kv_cache_blocks=load.kv_blocks,
        max_model_len=load.input_len + load.output_len + load.block_size,
        trace=args.trace,
        exit_workers=True,
    )
    startup_s = time.time() - started
    rng = np.random.default_rng(0)
    vocab = min(llm.vocab_size, 100000)
    prompts = [
        rng.integers(0, vocab, load.input_len, dtype=np.int32) for _ in range(load.num_requests)
    ]
    # warm-up: a full prefill chunk of prompts (its kernels compile now, not in the window)
    warm = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0)
    num_warm = max(2 * args.pp, load.max_num_tokens // load.input_len)
    llm.generate(prompts[:num_warm], warm, use_tqdm=False)
    params = SamplingParams(max_tokens=load.output_len, ignore_eos=True, temperature=0)
    window_start = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    window_end = time.time()
    stage_layers = [stage.num_layers for stage in llm._engine.stages]
    device = llm._engine.device
    llm.shutdown()
    common.emit_worker_result(
        {
            "startup_s": startup_s,
            "window_start": window_start,
            "window_end": window_end,
            "output_tokens": sum(len(o.token_ids) for o in outputs),
            "ttft_s": sorted(o.metrics.ttft for o in outputs),
            "tpot_s": sorted(
                (o.metrics.finished_time - o.metrics.first_token_time)
                / max(len(o.token_ids) - 1, 1)
                for o in outputs
            ),
            "stage_layers": stage_layers,
            "copy_bandwidth_bytes_per_s": measured_bandwidth(llm, device, args.small),
        }
    )


def measured_bandwidth(llm, device, small: bool) -> float:
    """Device copy bandwidth on rank 0's device, once the engine's memory is released."""
    import gc

    import torch
    from _bench_models import copy_bandwidth

    llm._engine = llm._executor = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return copy_bandwidth(device, small)


def worker_args(run: Run, checkpoint: Path, trace: Path, args, machine: Machine) -> list[str]:
    load = run.load
    out = ["--model", str(checkpoint), "--pp", str(run.pp), "--channel", run.channel]
    out += ["--trace", str(trace), "--dtype", run_dtype(args, machine)]
    out += ["--num-requests", str(load.num_requests), "--input-len", str(load.input_len)]
    out += ["--output-len", str(load.output_len), "--max-batch-size", str(load.max_batch_size)]
    out += ["--max-num-tokens", str(load.max_num_tokens), "--block-size", str(load.block_size)]
    if machine.device == "cpu":
        out += ["--device", "cpu"]
    if args.small:
        out.append("--small")
    return out


def launch(run: Run, checkpoint: Path, trace: Path, args, machine: Machine) -> dict:
    env = {}
    if machine.device == "cuda":  # the first G GPUs; rank r computes on the r-th of them
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(machine.gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[: machine.gpus])
    return common.run_mpi_worker(
        run.pp,
        SCRIPT,
        worker_args(run, checkpoint, trace, args, machine),
        env=env,
        timeout_s=args.run_timeout,
        python=worker_python(),
    )


# ----------------------------------------------------------------------------------------
# the trace: busy time per rank, decode steps per stage (pure)
# ----------------------------------------------------------------------------------------
def read_trace(path: Path) -> dict[int, list[dict]]:
    """Spans per rank: name, start and end (host seconds), args."""
    trace = json.loads(path.read_text())
    spans: dict[int, list[dict]] = {}
    for event in trace["traceEvents"]:
        if event.get("ph") != "X":
            continue
        start = event["ts"] * 1e-6
        spans.setdefault(int(event["tid"]), []).append(
            {
                "name": event["name"],
                "start": start,
                "end": start + event["dur"] * 1e-6,
                "args": event.get("args", {}),
            }
        )
    return spans


def union_within(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of the intervals, clipped to [lo, hi]."""
    total, reach = 0.0, lo
    for start, end in sorted(intervals):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


def rank_figures(spans: list[dict], lo: float, hi: float) -> dict:
    window = hi - lo
    inside = [s for s in spans if s["end"] > lo and s["start"] < hi]
    device = [(s["start"], s["end"]) for s in inside if s["name"] in DEVICE_SPANS]
    host = [(s["start"], s["end"]) for s in inside if s["name"] in HOST_COMPUTE_SPANS]
    busy = union_within(device, lo, hi) / window
    decode = [s for s in inside if s["name"] == DECODE_SPAN and lo <= s["start"] and s["end"] <= hi]
    host_s: dict[str, float] = {}
    for s in inside:
        if s["name"] not in DEVICE_SPANS:
            host_s[s["name"]] = host_s.get(s["name"], 0.0) + min(s["end"], hi) - max(s["start"], lo)
    return {
        "busy_fraction": busy,
        "bubble_fraction": max(0.0, 1.0 - busy),
        "host_compute_fraction": union_within(host, lo, hi) / window,
        "decode_steps": len(decode),
        "decode_step_s": mean([s["end"] - s["start"] for s in decode]),
        "decode_seqs_mean": mean([s["args"].get("seqs", 0) for s in decode]),
        "decode_context_tokens_mean": mean([s["args"].get("context_tokens", 0) for s in decode]),
        "host_span_s": host_s,
    }


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def stage_roofline(
    shape: Shape, layers: int, is_last: bool, context_tokens: float, bandwidth: float, element: int
) -> dict:
    """A decode step's HBM bytes on one stage (its layers' weights, the head on the last
    stage; the first stage's embedding is a gather of a few rows) and its roofline."""
    weights = layers * (shape.layer_params + 2 * shape.hidden_size) * element
    if is_last:
        weights += shape.head_bytes(element)
    kv = context_tokens * layers * shape.kv_bytes_per_token_layer(element)
    return {"weight_bytes": weights, "kv_bytes": kv, "roofline_s": (weights + kv) / bandwidth}


def run_figures(run: Run, result: dict, trace: Path, element: int) -> dict:
    lo, hi = result["window_start"], result["window_end"]
    spans = read_trace(trace)
    ranks = []
    for rank in range(run.pp):
        figures = rank_figures(spans.get(rank, []), lo, hi)
        layers = result["stage_layers"][rank]
        context = figures["decode_context_tokens_mean"]
        if figures["decode_step_s"] and context is not None:
            roof = stage_roofline(
                run.shape, layers, rank == run.pp - 1, context,
                result["copy_bandwidth_bytes_per_s"], element,
            )  # fmt: skip
            roof["roofline_fraction"] = roof["roofline_s"] / figures["decode_step_s"]
            figures.update(roof)
        ranks.append({"rank": rank, "layers": layers, **figures})
    window = hi - lo
    ttft, tpot = result["ttft_s"], result["tpot_s"]
    return {
        "label": run.label,
        "shape": run.shape_key,
        "layers": run.shape.num_hidden_layers,
        "pp": run.pp,
        "channel": run.channel,
        "num_requests": run.load.num_requests,
        "max_batch_size": run.load.max_batch_size,
        "window_s": window,
        "startup_s": result["startup_s"],
        "output_tokens": result["output_tokens"],
        "output_tokens_per_s": result["output_tokens"] / window,
        "ttft_p50_s": common.percentile(ttft, 50),
        "ttft_p99_s": common.percentile(ttft, 99),
        "tpot_p50_s": common.percentile(tpot, 50),
        "tpot_p99_s": common.percentile(tpot, 99),
        "copy_bandwidth_bytes_per_s": result["copy_bandwidth_bytes_per_s"],
        "ranks": ranks,
        "trace": str(trace),
    }


def add_efficiencies(runs: list[dict]) -> None:
    """efficiency = tput(PP=N) / ((N / N0) x tput(PP=N0)), N0 the shape's smallest PP
    (1 for the 8B shape: the issue's tput(PP=N) / (N x tput(PP=1)))."""
    for shape in dict.fromkeys(r["shape"] for r in runs):
        mine = [r for r in runs if r["shape"] == shape]
        smallest = min(r["pp"] for r in mine)
        bases = [r for r in mine if r["pp"] == smallest]
        for r in mine:
            # the same channel's run where there is one (PP=1 has none)
            base = next((b for b in bases if b["channel"] == r["channel"]), bases[0])
            scale = r["pp"] / base["pp"]
            r["efficiency"] = r["output_tokens_per_s"] / (scale * base["output_tokens_per_s"])
            r["efficiency_base_pp"] = base["pp"]


def channel_shares(runs: list[dict]) -> dict:
    """tput(host) / tput(nccl) (gloo on CPU) for each shape and PP where both ran."""
    shares = {}
    by_key = {(r["shape"], r["pp"], r["channel"]): r for r in runs}
    for (shape, pp, channel), r in by_key.items():
        if channel != "host":
            continue
        for other in ("nccl", "gloo"):
            peer = by_key.get((shape, pp, other))
            if peer is not None:
                ratio = r["output_tokens_per_s"] / peer["output_tokens_per_s"]
                shares[f"{shape}_pp{pp}_host_over_{other}"] = ratio
    return shares


# ----------------------------------------------------------------------------------------
# the timeline picture
# ----------------------------------------------------------------------------------------
def draw_timeline(run: dict, png: Path) -> list[str]:
    """The whole run, and a zoom on a few decode rounds in the middle of the window."""
    import plot_timeline

    trace = Path(run["trace"])
    spans = read_trace(trace)
    origin = min(s["start"] for rank in spans.values() for s in rank)
    steps = [r["decode_step_s"] for r in run["ranks"] if r["decode_step_s"]]
    middle = (run["window_s"] / 2 + (run["trace_window_start"] - origin)) * 1e3
    width = 6 * run["pp"] * max(steps) * 1e3 if steps else run["window_s"] * 50
    zoom = png.with_name(png.stem + "-zoom" + png.suffix)
    plot_timeline.main([str(trace), "-o", str(png)])
    plot_timeline.main(
        [str(trace), "-o", str(zoom), "--start-ms", f"{middle - width / 2:.3f}",
         "--end-ms", f"{middle + width / 2:.3f}"]
    )  # fmt: skip
    return [str(png), str(zoom)]


# ----------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------
def _ratio(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_lines(result: dict) -> list[str]:
    machine = result["machine"]
    lines = [
        f"{machine['name']}: {machine['gpus']} device(s), {gib(machine['memory_bytes'])} "
        f"each; load {result['load']['num_requests']} requests of "
        f"{result['load']['input_len']} + {result['load']['output_len']} tokens",
    ]
    if result.get("cut_70b"):
        cut = result["cut_70b"]
        lines.append(f"70b shape: {cut.get('layers')} layers ({cut.get('why')})")
    lines.append(
        f"{'run':<20} {'reqs':>5} {'tok/s':>9} {'eff':>6} {'TTFT p50':>9} {'busy per rank':<24} "
        f"{'bubble per rank':<24} {'decode ms / roof % per stage'}"
    )
    for r in result["runs"]:
        busy = " ".join(f"{x['busy_fraction']:.2f}" for x in r["ranks"])
        bubble = " ".join(f"{x['bubble_fraction']:.2f}" for x in r["ranks"])
        stages = " ".join(
            f"{x['decode_step_s'] * 1e3:.2f}/{x.get('roofline_fraction', 0) * 100:.0f}%"
            if x["decode_step_s"]
            else "-"
            for x in r["ranks"]
        )
        lines.append(
            f"{r['label']:<20} {r['num_requests']:>5} {r['output_tokens_per_s']:>9.1f} "
            f"{_ratio(r.get('efficiency')):>6} "
            f"{r['ttft_p50_s'] * 1e3:>7.1f}ms {busy:<24} {bubble:<24} {stages}"
        )
    if result["not_run"]:
        lines.append(f"not run (--time-budget-s): {', '.join(result['not_run'])}")
    for failure in result["failed"]:
        lines.append(f"{failure['label']}: FAILED (its output is in the JSON's 'failed')")
    for key, value in result["channel_shares"].items():
        lines.append(f"{key} = {value:.3f}")
    for key, value in result["targets"].items():
        lines.append(f"target {key}: {value}")
    return lines


def check_targets(runs: list[dict]) -> dict:
    """Each target of issue 15 beside what this invocation measured (None: not run)."""
    out = {}
    for pp, key in ((2, "efficiency_pp2"), (4, "efficiency_pp4")):
        got = [
            f"{r['channel']} {r['efficiency']:.3f}"
            for r in runs
            if r["shape"] in ("8b", "small") and r["pp"] == pp
        ]
        out[key] = f">= {TARGETS[key]}: measured {', '.join(got) or 'not run'}"
    fractions = [
        x["roofline_fraction"]
        for r in runs
        if r["shape"] in ("70b", "small-70b")
        for x in r["ranks"]
        if "roofline_fraction" in x
    ]
    lowest = f"{min(fractions):.3f}" if fractions else "not run"
    out["roofline_70b"] = f"every stage >= {TARGETS['roofline_70b']}: lowest measured {lowest}"
    return out


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def check_disk(runs: list[Run], workdir: Path, keep: bool) -> None:
    """Before anything runs: room for the checkpoints (all of them when kept, else the
    largest: each is deleted after its shape's last run)."""
    sizes = {
        run.shape.name: run.shape.checkpoint_bytes()
        for run in runs
        if not (workdir / run.shape.name / "model.safetensors.index.json").exists()
    }
    need = sum(sizes.values()) if keep else max(sizes.values(), default=0)
    free = shutil.disk_usage(workdir).free
    if need > 0.95 * free:
        raise SystemExit(
            f"the checkpoints ({', '.join(f'{k} {gib(v)}' for k, v in sizes.items())}) need "
            f"{gib(need)} at once but {workdir} has {gib(free)} free: give --workdir on a "
            "larger disk, fewer --shapes, or --layers-70b"
        )


def checkpoint_for(shape: Shape, workdir: Path, machine: Machine) -> Path:
    """A random checkpoint of `shape` (reused when complete). On a GPU it is written by
    a child process, whose CUDA context goes with it: the driver leaves the GPUs to
    the ranks. On the CPU it is written here (faster)."""
    directory = workdir / shape.name
    began = time.perf_counter()
    if machine.device == "cpu":
        from _bench_models import reuse_or_write_checkpoint

        done = reuse_or_write_checkpoint(shape, directory, torch_cpu())
        print(f"{'wrote' if done else 'reused'} {directory} in {_since(began)}", flush=True)
        return directory
    command = [worker_python(), SCRIPT, "--make-checkpoint", str(directory)]
    command += ["--shape-json", json.dumps(asdict(shape)), "--device", machine.device]
    env = common.worker_env({"CUDA_VISIBLE_DEVICES": first_gpu()})
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"writing {directory} failed:\n{done.stdout}{done.stderr[-4000:]}")
    size = gib(shape.checkpoint_bytes())
    print(f"{done.stdout.strip()} {directory} ({size}) in {_since(began)}", flush=True)
    return directory


def first_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[0] if visible else "0"


def torch_cpu():
    import torch

    return torch.device("cpu")


def _since(began: float) -> str:
    return f"{time.perf_counter() - began:.1f} s"


def gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**28 else f"{size / 2**20:.2f} MiB"


def make_checkpoint(args) -> int:
    """Child of write_checkpoints: print whether it wrote or reused the checkpoint."""
    import torch
    from _bench_models import reuse_or_write_checkpoint

    shape = Shape(**json.loads(args.shape_json))
    written = reuse_or_write_checkpoint(
        shape, Path(args.make_checkpoint), torch.device(args.device)
    )
    print("wrote" if written else "reused")
    return 0


def drive(args) -> int:
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        print("run the driver without mpirun: it starts its own MPI jobs", file=sys.stderr)
        return 2
    if args.make_checkpoint:
        return make_checkpoint(args)
    settle_defaults(args)
    machine = probe_machine(args)
    if args.small and machine.device == "cpu":
        machine = Machine("cpu", machine.gpus, pretend_memory(args), "cpu (pretend memory)")
    if args.pp is None:  # 1, 2, 4 as the GPUs allow (one GPU: PP=2 shares it)
        args.pp_sizes = [p for p in args.pp_sizes if p <= max(machine.gpus, 2)]
    check_channels(args.channels, machine, args.pp_sizes)
    if args.png and not can_draw():
        print("matplotlib is missing: no --png (the traces are kept for plot_timeline.py)")
        args.png = None
    load = load_from(args)
    runs, cut = plan_runs(args, machine, load)
    if cut:
        print(f"70b shape: {cut.get('layers')} layers: {cut.get('why')}", flush=True)
    if not runs:
        raise SystemExit("nothing to run: check --shapes, --pp and --gpus")

    def record(progress: Progress) -> dict:
        """The summary so far, to --out after every run (a command cut short keeps it)."""
        summary = summarise(progress, args, machine, load, cut)
        if args.out:  # unrounded: a roofline on the CPU is microseconds
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    progress = Progress()
    with workdir_for(args) as workdir:
        execute(runs, workdir, args, machine, progress, record)
    progress.complete = True
    summary = record(progress)
    print("\n".join(table_lines(summary)))
    if args.json:
        print(json.dumps(summary), flush=True)
    return 1 if progress.failed else 0


@dataclass
class Progress:
    """What the runs gave so far."""

    results: list = field(default_factory=list)  # run_figures of each finished run
    failed: list = field(default_factory=list)  # {"label", "error"} of each failed run
    png: list | None = None
    not_run: list = field(default_factory=list)  # labels left out by --time-budget-s
    complete: bool = False


class TimeBudget:
    """--time-budget-s: start nothing that the longest run so far would take past it."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = self.last = time.perf_counter()
        self.longest = 0.0

    def allows(self) -> bool:
        if self.seconds is None:
            return True
        return time.perf_counter() - self.started + self.longest <= self.seconds

    def ran(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now


def settle_defaults(args) -> None:
    default_pp = "1,2" if args.gpus == 1 or args.device == "cpu" else "1,2,4"
    args.pp_sizes = [int(p) for p in (args.pp or default_pp).split(",")]
    args.shapes = args.shapes.split(",")
    on_cpu = args.device == "cpu"
    if args.channels is None:
        args.channels = "gloo" if on_cpu else ("host" if args.gpus == 1 else "nccl")
    args.channels = args.channels.split(",")
    if args.gpus == 1 and not on_cpu and "nccl" in args.channels:
        raise SystemExit(
            "--gpus 1 with the nccl channel: NCCL refuses two ranks on one GPU, so PP=2 on one "
            "GPU cannot use it; pass --channels host (ranks sharing the GPU)"
        )
    if args.small:
        for name, value in (("num_requests", 8), ("input_len", 16), ("output_len", 8)):
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.max_num_tokens = args.max_num_tokens or 64
    for name, value in (("num_requests", 256), ("input_len", 512), ("output_len", 256)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.max_num_tokens = args.max_num_tokens or 8192


def pretend_memory(args) -> int:
    """CPU --small: a device memory that four layers of the small 70B shape (with the KV
    of the load) fill, so the layer cut is computed as on GPUs."""
    shape = SHAPES["small-70b"]
    load = load_from(args)
    element = 4 if (args.dtype or "float32") == "float32" else 2
    per_layer = (shape.layer_params + 2 * shape.hidden_size) * element
    per_layer += shape.kv_bytes_per_token_layer(element) * load.kv_tokens
    fixed = shape.with_layers(1).checkpoint_bytes(element) - (
        (shape.layer_params + 2 * shape.hidden_size) * element
    )
    return int(fixed + 4 * per_layer)


class workdir_for:
    """--workdir (kept: checkpoints are reused by the next invocation) or a temp dir."""

    def __init__(self, args) -> None:
        self.path = args.workdir
        self._temp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if self.path:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return Path(self.path)
        self._temp = tempfile.TemporaryDirectory(prefix="bench-pp-gpus-")
        return Path(self._temp.name)

    def __exit__(self, *exc_info) -> None:
        if self._temp is not None:
            self._temp.cleanup()


def execute(runs: list[Run], workdir: Path, args, machine: Machine, progress, record) -> None:
    """Every run, shape by shape: its checkpoint, its runs, then (unless --workdir keeps
    it) the checkpoint goes, making room for the next shape's. A run that fails is
    named in progress.failed with its output's tail, and the others still run."""
    keep = bool(args.workdir)
    check_disk(runs, workdir, keep)
    trace_dir = trace_dir_for(args, workdir)
    trace_dir.mkdir(parents=True, exist_ok=True)
    budget = TimeBudget(args.time_budget_s)
    for name in dict.fromkeys(run.shape.name for run in runs):
        mine = [run for run in runs if run.shape.name == name]
        if not budget.allows():
            progress.not_run += [run.label for run in mine]
            continue
        checkpoint = checkpoint_for(mine[0].shape, workdir, machine)
        for run in mine:
            if not budget.allows():
                progress.not_run.append(run.label)
                continue
            try:
                progress.results.append(one_run(run, checkpoint, trace_dir, args, machine))
            except RuntimeError as error:  # the job failed or timed out (its output in it)
                print(f"{run.label}: FAILED\n{error}", flush=True)
                progress.failed.append({"label": run.label, "error": str(error)[-3000:]})
                continue
            if args.png and run is largest_run(runs):
                progress.png = draw_timeline(progress.results[-1], Path(args.png))
            record(progress)
            budget.ran()
        if not keep:
            shutil.rmtree(checkpoint, ignore_errors=True)


def one_run(run: Run, checkpoint: Path, trace_dir: Path, args, machine: Machine) -> dict:
    trace = trace_dir / f"{run.label}.json"
    began = time.perf_counter()
    raw = launch(run, checkpoint, trace, args, machine)
    figures = run_figures(run, raw, trace, element_bytes(args, machine))
    figures["trace_window_start"] = raw["window_start"]
    print(
        f"{run.label}: {figures['output_tokens_per_s']:.1f} tok/s ({_since(began)} with start-up)",
        flush=True,
    )
    return figures


def trace_dir_for(args, workdir: Path) -> Path:
    """--trace-dir, else beside --out (OUT-traces/), else the work dir (a temp dir: gone)."""
    if args.trace_dir:
        return Path(args.trace_dir)
    if args.out:
        out = Path(args.out)
        return out.with_name(out.stem + "-traces")
    return workdir / "traces"


def can_draw() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def largest_run(runs: list[Run]) -> Run:
    """The run the timeline is drawn of: the largest PP of the first shape, first channel."""
    first = [r for r in runs if r.shape_key == runs[0].shape_key]
    return max(first, key=lambda r: r.pp)


def summarise(progress: Progress, args, machine: Machine, load: Load, cut: dict) -> dict:
    results = progress.results
    add_efficiencies(results)
    summary = {
        "complete": progress.complete,
        "machine": asdict(machine),
        "load": asdict(load),
        "weak_scaling": args.weak_scaling,
        "dtype": run_dtype(args, machine),
        "channels": args.channels,
        "cut_70b": cut,
        "runs": results,
        "channel_shares": channel_shares(results),
        "targets": check_targets(results),
        "failed": progress.failed,
        "not_run": progress.not_run,
    }
    if progress.png:
        summary["png"] = progress.png
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pp", default=None, help="pipeline sizes (default 1,2,4 as G allows; --gpus 1: 1,2)"
    )
    parser.add_argument("--shapes", default="8b,70b", help="8b and/or 70b (the cut 70B shape)")
    parser.add_argument(
        "--channels",
        default=None,
        help="activation channels of the PP>1 runs, e.g. nccl,host (default: nccl; "
        "--gpus 1: host; CPU: gloo)",
    )
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    parser.add_argument("--device", default=None, help="cpu for a dry run (default: the GPUs)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--layers-70b", type=int, default=None, help="force the 70B layer count")
    parser.add_argument("--num-requests", type=int, default=None, help="default 256")
    parser.add_argument("--input-len", type=int, default=None, help="default 512")
    parser.add_argument("--output-len", type=int, default=None, help="default 256")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="per microbatch (default: requests / PP, what the scheduler gives each)",
    )
    parser.add_argument(
        "--weak-scaling",
        action="store_true",
        help="PP times the requests at PP > 1 (microbatches as large as PP=1's batch)",
    )
    parser.add_argument("--max-num-tokens", type=int, default=None, help="default 8192")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default=None, help="default bfloat16 (CPU: float32)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--png", default=None, help="timeline of the largest PP run")
    parser.add_argument("--workdir", default=None, help="checkpoints (kept and reused) here")
    parser.add_argument("--trace-dir", default=None, help="traces here (default: beside --out)")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no run (or checkpoint) that the longest run so far would take past this",
    )
    # worker-only
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return common.run_benchmark(parser, argv, worker_entry, drive)


def worker_entry(args) -> None:
    args.pp = int(args.pp)
    worker(args)


if __name__ == "__main__":
    sys.exit(main())
