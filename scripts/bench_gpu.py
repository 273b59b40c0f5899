"""GPU benchmark: decode and prefill against the hardware's own roofline, side by side
with transformers, plus an attention-only micro-benchmark.

    python scripts/bench_gpu.py --out bench_gpu.json          # every case, one H200: ~8 min
    python scripts/bench_gpu.py --cases 1b-decode --no-attention
    python scripts/bench_gpu.py --small --device cpu --out x.json  # tiny shapes, seconds (tests)

It writes random bf16 checkpoints of the Llama-3.2-1B and Llama-3.1-8B shapes into a
temp dir (no download; no tokenizer: prompts are token ids), loads each as a user would
(`LLM(model=dir, ...)`), and measures, all in one process so the ratios compare like
with like:

- decode step time: (generate N new tokens - generate 1) / (N - 1); prefill time:
  generate 1 (the prompts' forward plus one sampling step);
- the HBM roofline of a decode step: (weight bytes + KV bytes read at the mean context)
  over the device-to-device copy bandwidth measured here (read + write bytes), and
  the step's fraction of it;
- prefill FLOP/s (matmuls + causal attention) over a bf16 matmul throughput measured here;
- the same decode/prefill times for transformers `generate` on the same checkpoint and
  prompts, and the ratio;
- on CUDA: the host time per decode step (wall time minus the time inside the calls that
  wait on the device, from the timed runs), and with the profiler the fraction of decode
  wall time the GPU was busy (union of kernel/copy intervals): `busy %` within the
  profiled run, whose host is slowed by the profiler's own work per launch, and
  `busy/u %`, the profiled busy time per step over the unprofiled step time (what the
  GPU does per step is the same with and without the profiler; the host is not).
  With async scheduling (the
  engine's default on CUDA at PP=1; --no-async-scheduling turns it off) the host's work
  of step k+1 overlaps the device's step k: the step time then approaches the larger of
  the two, not their sum;
- attention alone, through `select_attention_backend` (torch vs triton), a backend's
  whole per-layer forward (the KV store and attention; triton's decode is one launch
  that does both with PPRUNTIME_FUSED_KV_STORE=1, two by default): decode at batch 64
  over contexts 512..32k (fraction of the copy bandwidth its KV bytes need) and a
  4k-token prefill (fraction of the matmul throughput). "unavailable" when the backends
  are not there.

The JSON goes to --out (and stdout with --json); a short table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ppruntime import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_models import (  # Shape too: profile_decode.py reads it from here
    SHAPES,
    Shape,  # noqa: F401
    Timer,
    attention_prefill_flops,
    copy_bandwidth,
    time_op,
    write_checkpoint,
)


# -- cases (the shapes are in _bench_models.py) ------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    shape: str
    batch: int
    prompt_len: int
    new_tokens: int
    what: str  # the table rows this case measures


CASES = {
    "1b-decode": Case("1b-decode", "1b", 64, 128, 128, "decode 1B b64 128+128"),
    "8b-decode": Case("8b-decode", "8b", 64, 256, 64, "decode 8B b64 256+64; prefill 64x256"),
    "8b-long": Case(
        "8b-long", "8b", 16, 4000, 64, "decode 8B b16 4000+64; chunked prefill 16x4000"
    ),
}
SMALL_CASES = {"small-decode": Case("small-decode", "small", 4, 16, 8, "tiny shape, CPU")}


# -- measured hardware ceilings --------------------------------------------------------------
def matmul_throughput(device: torch.device, small: bool) -> float:
    """FLOP/s of a square bf16 matmul (float32 on CPU)."""
    n = 512 if small else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = time_op(lambda: a @ b, Timer(device), 3 if small else 10)
    return 2.0 * n**3 / seconds


# -- the runs -----------------------------------------------------------------------------------
class WaitClock:
    """Time the host spends waiting on the device, inside the calls that wait for it.

    While active it wraps CUDA event/stream/device synchronisation and the tensor calls
    that copy device memory to the host (`cpu`, `item`, `tolist`), summing their time in
    `waited_s`: wall time minus that is the time the host was doing its own work.
    """

    _PATCHES = (
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Stream, "synchronize"),
        (torch.cuda, "synchronize"),
        (torch.Tensor, "cpu"),
        (torch.Tensor, "item"),
        (torch.Tensor, "tolist"),
    )

    def __init__(self) -> None:
        self.waited_s = 0.0
        self._inside = threading.local()  # a wait inside a wait counts once

    def _wrap(self, function):
        def timed(*args, **kwargs):
            if getattr(self._inside, "wait", False):
                return function(*args, **kwargs)
            self._inside.wait = True
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.waited_s += time.perf_counter() - started
                self._inside.wait = False

        return timed

    @contextlib.contextmanager
    def active(self):
        saved = [(owner, name, getattr(owner, name)) for owner, name in self._PATCHES]
        try:
            for owner, name, function in saved:
                setattr(owner, name, self._wrap(function))
            yield self
        finally:
            for owner, name, function in saved:
                setattr(owner, name, function)


@dataclass
class RunTimes:
    prefill_s: float
    decode_step_s: float
    gen1_s: float
    genn_s: float
    host_time_per_step_ms: float | None = None  # CUDA only: wall minus waits on the device


def decode_times(generate, new_tokens: int, timer: Timer, count_waits: bool) -> RunTimes:
    generate(2)  # warm-up: compiles, captures, allocates
    clocks = [WaitClock(), WaitClock()]
    with timer() as one, clocks[0].active() if count_waits else contextlib.nullcontext():
        generate(1)
    with timer() as many, clocks[1].active() if count_waits else contextlib.nullcontext():
        generate(new_tokens)
    steps = max(new_tokens - 1, 1)
    times = RunTimes(one["s"], (many["s"] - one["s"]) / steps, one["s"], many["s"])
    if count_waits:
        host_one = one["s"] - clocks[0].waited_s
        host_many = many["s"] - clocks[1].waited_s
        times.host_time_per_step_ms = (host_many - host_one) / steps * 1e3
    return times


def gpu_busy_s(generate, new_tokens: int, trace_dir: Path) -> tuple[float, float]:
    """(wall s, GPU busy s) of generate(new_tokens) under the CUDA profiler.

    Busy time is the union of the kernel, copy and memset intervals (concurrent work on
    several streams counts once).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        started = time.perf_counter()
        generate(new_tokens)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    path = trace_dir / f"trace-{new_tokens}-{time.monotonic_ns()}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text()).get("traceEvents", [])
    path.unlink()
    intervals = [
        (float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0)))
        for event in events
        if event.get("ph") == "X"
        and str(event.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    return wall, _union_length(intervals) * 1e-6


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def busy_fraction(generate, new_tokens: int, trace_dir: Path) -> dict[str, float | None]:
    """GPU busy time over wall time of decode steps: generate(n) minus generate(1), profiled."""
    steps = min(new_tokens, 32)
    wall_one, busy_one = gpu_busy_s(generate, 1, trace_dir)
    wall_many, busy_many = gpu_busy_s(generate, steps, trace_dir)
    wall = wall_many - wall_one
    decode_steps = max(steps - 1, 1)  # generate(1) is the prefill alone
    return {
        "gpu_busy_fraction": (busy_many - busy_one) / wall if wall > 0 else None,
        "profiled_steps": steps,
        # the profiler's own host work (per launch and per copy) lengthens the profiled
        # steps; the device's busy time per step is what the profiler measures exactly
        "profiled_step_s": wall / decode_steps,
        "gpu_busy_s_per_step": (busy_many - busy_one) / decode_steps,
    }


def prompts_for(case: Case, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, min(vocab, 100000), (case.batch, case.prompt_len)).astype(np.int32)


def engine_kwargs(case_list: list[Case], block_size: int, attention_backend: str | None) -> dict:
    blocks = max(c.batch * -(-(c.prompt_len + c.new_tokens) // block_size) for c in case_list)
    tokens = max(c.batch * c.prompt_len for c in case_list)
    kwargs = dict(
        max_batch_size=max(c.batch for c in case_list),
        max_num_tokens=min(tokens, 16384),  # the 16x4000 case runs as chunked prefill
        block_size=block_size,
        kv_cache_blocks=blocks + 8,
        max_model_len=max(c.prompt_len + c.new_tokens for c in case_list) + block_size,
        seed=0,
    )
    if attention_backend is not None:
        if "attention_backend" not in inspect.signature(LLM.__init__).parameters:
            raise SystemExit("--attention-backend needs ppruntime with attention backends")
        kwargs["attention_backend"] = attention_backend
    return kwargs


def run_ppruntime(
    checkpoint: Path, case_list: list[Case], args, device: torch.device, trace_dir: Path
) -> dict[str, dict]:
    timer = Timer(device)
    kwargs = engine_kwargs(case_list, args.block_size, args.attention_backend)
    if args.async_scheduling is not None:  # else the engine's default: on for CUDA at PP=1
        kwargs["async_scheduling"] = args.async_scheduling
    started = time.perf_counter()
    llm = LLM(model=str(checkpoint), dtype="bfloat16", device=device.type, **kwargs)
    startup_s = time.perf_counter() - started
    overlapped = getattr(llm._executor, "overlap", None) is not None
    results = {}
    try:
        for case in case_list:
            prompts = list(prompts_for(case, llm.vocab_size))

            def generate(n: int, prompts=prompts) -> None:
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                llm.generate(prompts, params, use_tqdm=False)

            on_cuda = device.type == "cuda"
            times = decode_times(generate, case.new_tokens, timer, count_waits=on_cuda)
            busy = {"gpu_busy_fraction": None}
            if on_cuda and args.profile:
                busy = busy_fraction(generate, case.new_tokens, trace_dir)
            results[case.name] = {
                **asdict(times),
                **busy,
                "startup_s": startup_s,
                "async_scheduling": overlapped,
            }
    finally:
        llm.shutdown()
        llm = None  # the weights and the KV cache go before transformers loads its copy
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run_transformers(
    checkpoint: Path, case_list: list[Case], device: torch.device
) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM

    timer = Timer(device)
    dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype).to(device).eval()
    results = {}
    try:
        for case in case_list:
            ids = torch.from_numpy(prompts_for(case, model.config.vocab_size)).long().to(device)
            mask = torch.ones_like(ids)

            def generate(n: int, ids=ids, mask=mask) -> None:
                with torch.inference_mode():
                    model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        pad_token_id=0,
                    )

            times = decode_times(generate, case.new_tokens, timer, count_waits=False)
            results[case.name] = asdict(times)
    finally:
        model = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def figures(
    case: Case, ours: dict, reference: dict | None, bandwidth: float, matmul: float
) -> dict:
    shape = SHAPES[case.shape]
    mean_context = case.prompt_len + case.new_tokens / 2
    weight_bytes = shape.weight_bytes_per_step()
    kv_bytes = case.batch * mean_context * shape.kv_bytes_per_token()
    roofline_s = (weight_bytes + kv_bytes) / bandwidth
    flops = shape.prefill_flops(case.batch, case.prompt_len)
    row = {
        "case": case.what,
        "shape": shape.name,
        "batch": case.batch,
        "prompt_len": case.prompt_len,
        "new_tokens": case.new_tokens,
        "decode_step_ms": ours["decode_step_s"] * 1e3,
        "prefill_s": ours["prefill_s"],
        "decode_roofline_ms": roofline_s * 1e3,
        "decode_roofline_fraction": roofline_s / ours["decode_step_s"],
        "weight_bytes": weight_bytes,
        "kv_bytes_at_mean_context": kv_bytes,
        "prefill_flops": flops,
        "prefill_flops_per_s": flops / ours["prefill_s"],
        "prefill_matmul_fraction": flops / ours["prefill_s"] / matmul,
        "gpu_busy_fraction": ours.get("gpu_busy_fraction"),
        # the profiled busy time per step over the unprofiled step: the busy fraction
        # without the profiler's slow-down of the host
        "gpu_busy_over_unprofiled_step": (
            ours["gpu_busy_s_per_step"] / ours["decode_step_s"]
            if ours.get("gpu_busy_s_per_step") is not None
            else None
        ),
        "profiled_step_ms": (
            ours["profiled_step_s"] * 1e3 if ours.get("profiled_step_s") is not None else None
        ),
        "host_time_per_step_ms": ours.get("host_time_per_step_ms"),
        "startup_s": ours.get("startup_s"),
        "ppruntime": ours,
    }
    if reference is not None:
        row["transformers"] = reference
        row["transformers_decode_step_ms"] = reference["decode_step_s"] * 1e3
        row["transformers_prefill_s"] = reference["prefill_s"]
        row["decode_speedup_vs_transformers"] = reference["decode_step_s"] / ours["decode_step_s"]
        row["prefill_speedup_vs_transformers"] = reference["prefill_s"] / ours["prefill_s"]
    return row


# -- attention alone -------------------------------------------------------------------------------
@dataclass
class AttentionSetup:
    batch: int
    contexts: list[int]
    prefill_len: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    repeats: int = 5
    results: dict = field(default_factory=dict)


def attention_benchmark(setup: AttentionSetup, device: torch.device, bandwidth, matmul) -> dict:
    try:
        from ppruntime.model.attention import AttentionMetadata
        from ppruntime.model.backends import select_attention_backend
    except ImportError as exc:
        return {"status": "unavailable", "reason": f"ppruntime.model.backends: {exc}"}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    element = torch.tensor([], dtype=dtype).element_size()
    timer = Timer(device)
    bs = setup.block_size
    max_tokens = max(setup.batch * max(setup.contexts), setup.prefill_len)
    num_blocks = -(-max_tokens // bs) + 1
    cache = torch.randn(
        (2, num_blocks, bs, setup.kv_heads, setup.head_dim), dtype=dtype, device=device
    )
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks - 1, generator=generator).to(device)  # scattered blocks
    scale = setup.head_dim**-0.5
    flat_cache = cache.view(2, num_blocks * bs, setup.kv_heads, setup.head_dim)

    def inputs(num_tokens: int, slots: torch.Tensor, seed: int):
        # k, v: what the cache already holds at the slots, so that the forward's KV write
        # changes nothing and every backend reads the same cache
        torch.manual_seed(seed)
        q = torch.randn(num_tokens, setup.heads, setup.head_dim, dtype=dtype, device=device)
        return q, flat_cache[0, slots].clone(), flat_cache[1, slots].clone()

    reference_outputs: dict[str, torch.Tensor] = {}

    def compared(key: str, result: torch.Tensor) -> float:
        """Max abs difference from the torch backend's output on the same inputs."""
        if key not in reference_outputs:
            reference_outputs[key] = result.float()
            return 0.0
        return (result.float() - reference_outputs[key]).abs().max().item()

    out: dict = {"status": "ok", "decode": {}, "prefill": {}}
    for name in ("torch", "triton"):
        try:
            backend = select_attention_backend(name, device)
        except Exception as exc:  # any refusal makes this backend unavailable
            out["decode"][name] = out["prefill"][name] = f"unavailable: {exc}"
            continue
        decode = {}
        for context in setup.contexts:
            blocks_per_seq = -(-context // bs)
            if setup.batch * blocks_per_seq > num_blocks - 1:
                continue
            table = order[: setup.batch * blocks_per_seq].view(setup.batch, blocks_per_seq)
            last = context - 1
            # the engine's dtypes: int64 but for the int32 block table, read through rows
            attn = AttentionMetadata(
                query_start_loc=torch.arange(setup.batch + 1, device=device),
                seq_lens=torch.full((setup.batch,), context, device=device),
                block_table=table.to(torch.int32),
                slot_mapping=table[:, last // bs] * bs + last % bs,
                max_query_len=1,
                max_seq_len=context,
                block_table_rows=torch.arange(setup.batch, device=device),
            )
            positions = torch.full((setup.batch,), last, device=device, dtype=torch.int64)
            q, k, v = inputs(setup.batch, attn.slot_mapping, context)

            def step(attn=attn, positions=positions, q=q, k=k, v=v, backend=backend):
                plan = backend.plan(attn, positions, bs)
                return backend.forward(q, k, v, cache, plan, scale, None)

            seconds = time_op(step, timer, setup.repeats)
            kv_bytes = setup.batch * context * 2 * setup.kv_heads * setup.head_dim * element
            decode[str(context)] = {
                "ms": seconds * 1e3,
                "kv_bandwidth_fraction": kv_bytes / seconds / bandwidth,
                "max_abs_diff_vs_torch": compared(f"decode-{context}", step()),
            }
        out["decode"][name] = decode
        length = setup.prefill_len
        blocks_per_seq = -(-length // bs)
        table = order[:blocks_per_seq].view(1, blocks_per_seq)
        token = torch.arange(length, device=device)
        attn = AttentionMetadata(
            query_start_loc=torch.tensor([0, length], device=device),
            seq_lens=torch.tensor([length], device=device),
            block_table=table.to(torch.int32),
            slot_mapping=table[0, token // bs] * bs + token % bs,
            max_query_len=length,
            max_seq_len=length,
            block_table_rows=torch.zeros(1, dtype=torch.int64, device=device),
        )
        q, k, v = inputs(length, attn.slot_mapping, length)

        # the triton backend's prefill kernel as configured, beside its legacy all-masked
        # loop (PPRUNTIME_TRITON_PREFILL=legacy makes that the backend's choice) and the
        # tiled kernel with 64-key tiles (3 stages), for tuning
        launches: list = [(name, None)]
        if name == "triton":  # it imported, so triton is there
            from ppruntime.kernels.paged_attention import prefill_launch

            group = setup.heads // setup.kv_heads
            configured = prefill_launch(dtype, length, group)
            tiled = prefill_launch(dtype, length, group, kernel="tiled")
            launches = [
                (name, configured),
                (f"{name}-legacy", prefill_launch(dtype, length, group, kernel="legacy")),
            ]
            if tiled.block_n == 128:
                narrow = replace(tiled, block_n=64, num_stages=3)
                launches.append((f"{name}-tiled-n64", narrow))
        for entry, launch in launches:

            def prefill(attn=attn, q=q, k=k, v=v, token=token, backend=backend, launch=launch):
                plan = backend.plan(attn, token, bs)
                if launch is not None:
                    plan.launch = launch
                return backend.forward(q, k, v, cache, plan, scale, None)

            seconds = time_op(prefill, timer, max(setup.repeats // 2, 1))
            flops = attention_prefill_flops(1, length, setup.heads, setup.head_dim)
            out["prefill"][entry] = {
                "tokens": length,
                "ms": seconds * 1e3,
                "flops_per_s": flops / seconds,
                "matmul_fraction": flops / seconds / matmul,
                "max_abs_diff_vs_torch": compared("prefill", prefill()),
            }
            if launch is not None:
                out["prefill"][entry]["launch"] = str(launch)
    cache = flat_cache = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- driver ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated cases (default: all): {', '.join(CASES)}",
    )
    parser.add_argument("--small", action="store_true", help="a tiny shape that runs in seconds")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--out", default=None, help="write the JSON result to this file")
    parser.add_argument(
        "--json", action="store_true", help="also print the JSON (before the table)"
    )
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--no-attention", dest="attention", action="store_false")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--attention-backend", default=None, help="passed to LLM(...)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="passed to LLM(...) (default: the engine's, on for CUDA at PP=1)",
    )
    parser.add_argument(
        "--attention-contexts",
        default="512,1024,2048,4096,8192,16384,32768",
        help="decode contexts of the attention micro-benchmark",
    )
    parser.add_argument("--attention-batch", type=int, default=64)
    parser.add_argument("--attention-prefill", type=int, default=4096)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    if args.small:
        case_list = list(SMALL_CASES.values())
        setup = AttentionSetup(
            batch=4,
            contexts=[64, 256],
            prefill_len=128,
            heads=4,
            kv_heads=2,
            head_dim=16,
            repeats=2,
        )
    else:
        unknown = [name for name in args.cases.split(",") if name not in CASES]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
        case_list = [CASES[name] for name in args.cases.split(",")]
        setup = AttentionSetup(
            batch=args.attention_batch,
            contexts=[int(c) for c in args.attention_contexts.split(",")],
            prefill_len=args.attention_prefill,
        )
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, args.small)
    matmul = matmul_throughput(device, args.small)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": matmul,
        "cases": {},
    }
    if args.attention:
        result["attention"] = attention_benchmark(setup, device, bandwidth, matmul)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-gpu-") as tmp:
        workdir = Path(tmp)
        for shape_name in dict.fromkeys(case.shape for case in case_list):
            shape_cases = [case for case in case_list if case.shape == shape_name]
            began = time.perf_counter()
            checkpoint = write_checkpoint(SHAPES[shape_name], workdir / shape_name, device)
            result.setdefault("checkpoint_write_s", {})[shape_name] = time.perf_counter() - began
            ours = run_ppruntime(checkpoint, shape_cases, args, device, workdir)
            reference = (
                run_transformers(checkpoint, shape_cases, device) if args.transformers else {}
            )
            for case in shape_cases:
                result["cases"][case.name] = figures(
                    case, ours[case.name], reference.get(case.name), bandwidth, matmul
                )
            for path in checkpoint.iterdir():
                path.unlink()
    result["total_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2, default=float)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    print_table(result)
    return 0


def _fmt(value, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:.{digits}f}{suffix}"


def print_table(result: dict) -> None:
    print(
        f"device {result['device']}: copy {result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
        f"matmul {result['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
    )
    header = (
        f"{'case':<12} {'step ms':>8} {'roof ms':>8} {'roof %':>7} {'HF ms':>8} {'vs HF':>6} "
        f"{'prefill s':>9} {'mm %':>6} {'busy %':>6} {'busy/u %':>8} {'host ms':>7}"
    )
    print(header)
    for name, row in result["cases"].items():
        print(
            f"{name:<12} {_fmt(row['decode_step_ms']):>8} {_fmt(row['decode_roofline_ms']):>8} "
            f"{_fmt(row['decode_roofline_fraction'], 1, 100):>7} "
            f"{_fmt(row.get('transformers_decode_step_ms')):>8} "
            f"{_fmt(row.get('decode_speedup_vs_transformers'), 1, 1, 'x'):>6} "
            f"{_fmt(row['prefill_s'], 3):>9} {_fmt(row['prefill_matmul_fraction'], 1, 100):>6} "
            f"{_fmt(row.get('gpu_busy_fraction'), 1, 100):>6} "
            f"{_fmt(row.get('gpu_busy_over_unprofiled_step'), 1, 100):>8} "
            f"{_fmt(row.get('host_time_per_step_ms')):>7}"
        )
    attention = result.get("attention")
    if attention is None:
        return
    if attention.get("status") != "ok":
        print(f"attention: {attention.get('status')} ({attention.get('reason', '')})")
        return
    for backend, contexts in attention["decode"].items():
        if isinstance(contexts, str):
            print(f"attention {backend}: {contexts}")
            continue
        cells = " ".join(
            f"{ctx}:{_fmt(v['kv_bandwidth_fraction'], 0, 100, '%')}" for ctx, v in contexts.items()
        )
        prefill = attention["prefill"][backend]
        print(
            f"attention {backend}: decode KV-bandwidth {cells}; prefill "
            f"{prefill['tokens']} tokens {_fmt(prefill['matmul_fraction'], 1, 100, '%')} of matmul"
        )
    for backend, prefill in attention["prefill"].items():
        if backend in attention["decode"] or isinstance(prefill, str):
            continue  # printed with its decode figures
        print(
            f"attention {backend}: prefill {prefill['tokens']} tokens "
            f"{_fmt(prefill['matmul_fraction'], 1, 100, '%')} of matmul"
        )


if __name__ == "__main__":
    sys.exit(main())
