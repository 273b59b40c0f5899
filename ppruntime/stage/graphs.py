"""CUDA graphs for decode: capture a stage's decode forward per batch-size bucket, replay.

A decode microbatch (one new token per sequence) is padded to the smallest bucket
that holds it (`StepInputPool.prepare(batch, pad_to=...)` writes the padded rows:
slot -1, seq_len 0, position 0, token 0) and the bucket's graph is replayed. The
graph reads only fixed-address buffers: the step-input pool's device buffers, the
KV cache, the weights, and the stage's persistent input buffer (received
activations are copied into it). Its output buffer is overwritten by the next
replay, so the runner copies the real rows out at once. Prefill and mixed steps
run eagerly.

The same padding runs without graphs ("eager padded", `PPRUNTIME_PAD_DECODE=1`),
on CPU too: that is how the CPU tests prove padded rows are harmless.

Graphs need an attention backend without host synchronisation and whose shapes do
not depend on the context length: a backend says so with `supports_cuda_graphs =
True`; today's `torch` backend does not, so graphs stay off with it.
`PPRUNTIME_FORCE_CUDA_GRAPHS=1` captures anyway (tests): the `torch` backend has no
host sync in decode, and captured with a plan for the longest context it gives the
right numbers, only slowly (it gathers the whole context of every sequence).

The capture steps (`warm_up`, `capture_graph`, and `capture_split`, which cuts a run
into one graph per module call) also serve the layer-partition probe
(ppruntime/stage/cost_probe.py), which times decode pieces the way they run here.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ppruntime.logs import get_logger

log = get_logger("graphs")

SMALL_BUCKETS = (1, 2, 4)
BUCKET_STEP = 8


def capture_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, then steps of 8 up to max_batch_size (which is always the last)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    sizes = [size for size in SMALL_BUCKETS if size < max_batch_size]
    sizes += range(BUCKET_STEP, max_batch_size, BUCKET_STEP)
    sizes.append(max_batch_size)
    return tuple(sizes)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int:
    """The smallest size that holds num_seqs rows."""
    index = bisect.bisect_left(sizes, num_seqs)
    if index == len(sizes):
        raise ValueError(f"a decode batch of {num_seqs} exceeds the largest bucket {sizes[-1]}")
    return sizes[index]


def attention_backend_of(model: torch.nn.Module) -> object | None:
    """The attention backend a stage model computes with (None if it names none)."""
    for name in ("attention_backend", "backend"):
        backend = getattr(model, name, None)
        if backend is not None:
            return backend
    return None


@dataclass(frozen=True)
class DecodePlan:
    """How a stage runs decode microbatches.

    sizes: the buckets decode batches are padded to (empty: no padding).
    use_graphs: capture and replay a CUDA graph per bucket.
    reason: why graphs are off (for the log), or "" when they are on.
    """

    sizes: tuple[int, ...] = ()
    use_graphs: bool = False
    reason: str = ""

    @property
    def pads(self) -> bool:
        return bool(self.sizes)


def plan_decode(
    device: torch.device,
    model: torch.nn.Module,
    max_batch_size: int,
    cuda_graphs: bool,
    force_padding: bool = False,
    force_graphs: bool = False,
) -> DecodePlan:
    """Graphs on CUDA when enabled and the backend can be captured (or force_graphs);
    padding with them, or alone when forced (the CPU tests' "eager padded" mode)."""
    sizes = capture_sizes(max_batch_size)
    if device.type != "cuda":
        reason = f"the stage computes on {device.type}"
    elif not cuda_graphs:
        reason = "disabled (--enforce-eager / cuda_graphs=False)"
    else:
        backend = attention_backend_of(model)
        if force_graphs or getattr(backend, "supports_cuda_graphs", False):
            return DecodePlan(sizes, use_graphs=True)
        name = getattr(backend, "name", None) or type(backend).__name__
        if backend is None:
            name = "torch (paged_attention)"
        reason = (
            f"attention backend {name} is not capturable (host syncs, shapes that follow the "
            f"context length); choose one that sets supports_cuda_graphs"
        )
    return DecodePlan(sizes if force_padding else (), use_graphs=False, reason=reason)


@dataclass
class PaddingOnlyBatch:
    """A decode batch of no real sequence: prepare(pad_to=n) makes n padded rows."""

    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    num_new: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    sample_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))
    num_tokens: int = 0

    @property
    def num_seqs(self) -> int:
        return 0


def warm_up(run: Callable[[], object], side: torch.cuda.Stream, times: int = 2) -> None:
    """Run `run` eagerly on a side stream before it is captured: lazy initialisation,
    autotuning and workspaces happen here, not inside the capture."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(times):
            run()
    torch.cuda.current_stream().wait_stream(side)


def capture_graph(
    run: Callable[[], object], pool: object = None
) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture run() (warmed up already) into a graph; the graph and run's output, whose
    tensors every replay rewrites. pool: a graph memory pool to share (None: private)."""
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph, output


@dataclass
class SplitCapture:
    """run() captured as a chain of graphs cut at the calls of some modules: replaying
    `graphs` in order is run(); `in_module[i]` says whether graph i is one module call
    (else the work between, before or after them)."""

    graphs: list[torch.cuda.CUDAGraph]
    in_module: list[bool]
    kept: list[object]  # every piece's outputs: alive, so no later capture reuses them


def capture_split(run: Callable[[], object], modules: Sequence[torch.nn.Module]) -> SplitCapture:
    """Capture run() (warmed up already) as a chain of graphs, each with a memory pool
    of its own: the work before the first call of `modules`, one graph per call (from
    its start to the next call's: nothing runs between a stage's decoder layers, and a
    graph of no kernel cannot be replayed), and the work after the last module's call.
    Forward hooks end one capture and begin the next, so a module's graph holds its
    forward's kernels as they run inside the whole run."""
    split = SplitCapture([], [], [])
    last = modules[-1] if modules else None

    def begin(in_module: bool) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        split.graphs.append(graph)
        split.in_module.append(in_module)

    def before(module: torch.nn.Module, args: object) -> None:
        split.graphs[-1].capture_end()
        begin(True)

    def after(module: torch.nn.Module, args: object, output: object) -> None:
        split.kept.append(output)
        if module is last:
            split.graphs[-1].capture_end()
            begin(False)

    hooks = [module.register_forward_pre_hook(before) for module in modules]
    hooks += [module.register_forward_hook(after) for module in modules]
    torch.cuda.synchronize()
    try:
        with torch.cuda.stream(torch.cuda.Stream()), torch.inference_mode():
            begin(False)
            split.kept.append(run())
            split.graphs[-1].capture_end()
    finally:
        for hook in hooks:
            hook.remove()
    torch.cuda.synchronize()
    return split


@dataclass
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor  # [size, H]: rewritten by every replay


class DecodeGraphs:
    """The captured decode graphs of one stage, by bucket size (CUDA only)."""

    def __init__(self) -> None:
        self.graphs: dict[int, CapturedGraph] = {}
        self.capture_s = 0.0

    def __contains__(self, size: int) -> bool:
        return size in self.graphs

    def capture(
        self,
        sizes: tuple[int, ...],
        prepare: Callable[[int], object],
        run: Callable[[object, int], torch.Tensor],
    ) -> None:
        """Capture run(prepare(size), size) for every size.

        prepare(size) fills the step-input buffers with `size` padded rows and returns
        the step inputs; run(inputs, size) is the stage's eager forward on them, whose
        tensors must all live at fixed addresses. Largest first, sharing one memory
        pool (as vLLM does: the smaller graphs reuse the larger ones' blocks).
        """
        start = time.perf_counter()
        memory_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for size in sorted(sizes, reverse=True):
            forward = functools.partial(run, prepare(size), size)
            warm_up(forward, side)
            graph, output = capture_graph(forward, memory_pool)
            self.graphs[size] = CapturedGraph(graph, output)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on what the buffers hold now; its output [size, H]."""
        captured = self.graphs[size]
        captured.graph.replay()
        return captured.output
