"""Measure what the pieces of a stage cost on this rank (for `--layer-partition auto`).

Each rank builds throwaway models of the configured shape with random weights on its
own device and dtype: a middle stage of a few decoder layers, whose whole forward is
timed with each layer timed inside it (the layers' share gives one layer's cost, the
rest is the per-forward overhead), the embedding, and the last stage's head (final
norm, LM head, greedy sampling). Each is timed on a decode microbatch of
`max_batch_size` sequences and on a prefill chunk of `max_num_tokens` tokens (as
`max_batch_size` prompts sharing them, what a full prefill microbatch holds), in
interleaved rounds (medians); the two are mixed by the expected share of decode
microbatches. Nothing of the real checkpoint is read.

How a piece is timed is the one thing that depends on the device (`probe_timers`):
- CPU: eagerly, with this thread's CPU time (`HostClock`), each layer timed inside the
  whole forward by forward hooks;
- CUDA, decode, when the engine would replay decode from CUDA graphs
  (ppruntime/stage/graphs.py): each piece is captured as a graph (the whole stage
  forward once, and again cut into one graph per decoder layer, so a layer's time is
  its kernels inside the forward), and the graphs are replayed back to back behind a
  spin kernel, timed with CUDA events: the GPU never waits for the host, so the events
  measure GPU time, what a replayed microbatch costs. (Timed eagerly, a decode layer
  is ~15-20 launches whose host time the events would measure instead.)
- CUDA, prefill (and decode with graphs off): eagerly, with CUDA events, as the
  engine runs it (a prefill chunk keeps the GPU busy).
Ranks that share one GPU would time each other's kernels (the GPU time-slices
between processes): they probe one after the other (`ProbeTimers.take_turns`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends.base import AttentionBackend
from ppruntime.model.config import ModelConfig
from ppruntime.model.kv_cache import allocate_kv_cache
from ppruntime.model.layer_ops import LayerOps
from ppruntime.model.partition import RankCosts, StageBytes, StageSpec
from ppruntime.model.stage_model import StageModel
from ppruntime.stage.debug_knobs import StageKnobs
from ppruntime.stage.graphs import capture_graph, capture_split, plan_decode, warm_up

# A prefill chunk is timed at its real size up to this many tokens, then scaled: from
# a few hundred tokens on, a forward costs about its token count in matmuls (below,
# reading the weights once per forward dominates, so a short chunk must not be scaled).
PREFILL_PROBE_TOKENS = 512
PROBE_LAYERS = 4  # decoder layers of the timed stage


@dataclass(frozen=True)
class ProbeWorkload:
    """The representative microbatches the pieces are timed on."""

    max_batch_size: int
    max_num_tokens: int
    block_size: int
    decode_context: int = 256  # context length of each decode sequence
    decode_fraction: float = 0.9  # share of microbatches that are decode steps
    repeats: int = 5  # rounds: the median of each piece over them is taken

    def __post_init__(self) -> None:
        if not 0.0 <= self.decode_fraction <= 1.0:
            raise ValueError(
                f"partition decode fraction must be in [0, 1], got {self.decode_fraction!r}"
            )


def _fill_random(model: StageModel) -> StageModel:
    """Seeded random weights, drawn on the weights' own device (an 8B layer's 218M
    values would take seconds on one CPU thread)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.checkpoint_parameters().items():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                device = param.device
                if device not in generators:
                    generators[device] = torch.Generator(device=device).manual_seed(0)
                fan_in = param.shape[-1] if param.dim() > 1 else param.shape[0]
                values = torch.randn(param.shape, generator=generators[device], device=device)
                param.copy_(values / math.sqrt(fan_in))
    return model.eval()


def _decode_batch(
    batch: int, context: int, block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """`batch` sequences of `context` tokens each, one new token per sequence."""
    blocks_per_seq = -(-context // block_size)
    table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
    last = context - 1
    slots = table[:, last // block_size].to(torch.int64) * block_size + last % block_size
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int64).to(device),
        seq_lens=torch.full((batch,), context, dtype=torch.int64).to(device),
        block_table=table.to(device),
        slot_mapping=slots.to(device),
        max_query_len=1,
        max_seq_len=context,
    )
    return metadata, torch.full((batch,), last, dtype=torch.int64, device=device)


def _prefill_batch(
    tokens: int, num_seqs: int, block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """`num_seqs` sequences prefilling `tokens` tokens in all from position 0 (as even as
    they can be: the first ones take the remainder)."""
    num_seqs = max(min(num_seqs, tokens), 1)
    lengths = [tokens // num_seqs + (index < tokens % num_seqs) for index in range(num_seqs)]
    starts = [0]
    tables, slots, positions = [], [], []
    next_block = 0
    for length in lengths:
        starts.append(starts[-1] + length)
        blocks = -(-length // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        slots.extend(next_block * block_size + offset for offset in range(length))
        positions.extend(range(length))
        next_block += blocks
    width = max(len(table) for table in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int64, device=device),
        block_table=table.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(lengths),
        max_seq_len=max(lengths),
    )
    return metadata, torch.tensor(positions, dtype=torch.int64, device=device)


class HostClock:
    """This thread's CPU time when torch computes on this thread alone (one torch
    thread, ppruntime's default), so that other processes sharing the cores while the
    probe runs do not count; wall time otherwise."""

    def __init__(self) -> None:
        self._clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def mark(self) -> object:
        return self._clock()

    def seconds(self, start: object, end: object) -> float:
        return end - start  # type: ignore[operator]

    def synchronize(self) -> None:
        pass


class CudaEventClock:
    """Marks on the device's current stream (CUDA timing events)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> object:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: object, end: object) -> float:
        return start.elapsed_time(end) / 1e3  # type: ignore[union-attr]

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


Clock = HostClock | CudaEventClock


class _LayerTimes:
    """Times each decoder layer inside a whole stage forward (forward hooks), so the
    layers' cost and the rest of the forward come from the same forwards: no layer is
    timed in isolation with its weights hot in the cache. Records only while
    `recording` (the model may run untimed, or be captured into a graph, meanwhile)."""

    def __init__(self, model: StageModel, clock: Clock) -> None:
        self.clock = clock
        self.recording = False
        self.marks: list[tuple[object, object]] = []
        self._start: object = None
        for layer in model.layers:
            layer.register_forward_pre_hook(self._before)
            layer.register_forward_hook(self._after)

    def _before(self, module: torch.nn.Module, args: object) -> None:
        if self.recording:
            self._start = self.clock.mark()

    def _after(self, module: torch.nn.Module, args: object, output: object) -> None:
        if self.recording:
            self.marks.append((self._start, self.clock.mark()))

    def take_seconds(self) -> float:
        """Sum of the layer times marked since the last call (after a sync)."""
        total = sum(self.clock.seconds(start, end) for start, end in self.marks)
        self.marks.clear()
        return total


class PieceTimer(Protocol):
    """How the probe times its pieces. Each method prepares a piece once and returns
    the function that times one run of it (the probe calls it in interleaved rounds)."""

    def forward(
        self, model: StageModel, run: Callable[[], object]
    ) -> Callable[[], tuple[float, float]]:
        """run() is a whole forward of `model`: the timer returns (the forward's
        seconds, the seconds of its decoder layers inside it)."""
        ...

    def piece(self, run: Callable[[], object]) -> Callable[[], float]:
        """The seconds of one run()."""
        ...


class EagerTimer:
    """Runs each piece as it is (eager), between two marks of `clock`, then waits for
    the device; the layers are marked inside the forward by hooks."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._layer_times: dict[int, _LayerTimes] = {}

    def forward(
        self, model: StageModel, run: Callable[[], object]
    ) -> Callable[[], tuple[float, float]]:
        layer_times = self._layer_times.get(id(model))
        if layer_times is None:
            layer_times = self._layer_times[id(model)] = _LayerTimes(model, self.clock)

        def timed() -> tuple[float, float]:
            layer_times.take_seconds()
            layer_times.recording = True
            try:
                whole = self._timed(run)
            finally:
                layer_times.recording = False
            return whole, layer_times.take_seconds()

        return timed

    def piece(self, run: Callable[[], object]) -> Callable[[], float]:
        return lambda: self._timed(run)

    def _timed(self, run: Callable[[], object]) -> float:
        clock = self.clock
        start = clock.mark()
        run()
        end = clock.mark()
        clock.synchronize()
        return clock.seconds(start, end)


# cycles of the spin kernel queued before each timed replay sequence: ~1-2 ms on a GPU
# clocked at 1-2 GHz, longer than the host takes to queue the replays and their events
SPIN_CYCLES = 2_000_000


class CudaGraphTimer:
    """Decode pieces as the engine runs them: captured as CUDA graphs (the capture steps
    of ppruntime/stage/graphs.py), replayed `replays` times back to back behind a spin
    kernel, an event between every two replays; each graph's GPU time is the mean of
    its intervals. A forward is captured twice: whole (as the engine's decode graph) and
    cut at its decoder layers (one graph per layer, in the forward's order, so no layer
    runs with its weights hot from its own previous run)."""

    def __init__(self, device: torch.device, replays: int = 3) -> None:
        self.device = device
        self.replays = max(replays, 1)
        self._side = torch.cuda.Stream(device)
        # each captured run with its outputs: a graph reads and writes their addresses at
        # every replay, so what its closure holds (the inputs) must outlive the graph
        self._captured: list[object] = []

    def forward(
        self, model: StageModel, run: Callable[[], object]
    ) -> Callable[[], tuple[float, float]]:
        warm_up(run, self._side)
        whole, _ = capture_graph(run)
        split = capture_split(run, model.layers)
        self._captured.append((run, split.kept))
        graphs = [whole, *split.graphs]
        layer_indices = [1 + index for index, inside in enumerate(split.in_module) if inside]

        def timed() -> tuple[float, float]:
            seconds = self._replay_timed(graphs)  # the graphs live as long as this function
            return seconds[0], sum(seconds[index] for index in layer_indices)

        return timed

    def piece(self, run: Callable[[], object]) -> Callable[[], float]:
        warm_up(run, self._side)
        graph, output = capture_graph(run)
        self._captured.append((run, output))
        return lambda: self._replay_timed([graph])[0]

    def _replay_timed(self, graphs: list[torch.cuda.CUDAGraph]) -> list[float]:
        """Mean GPU seconds of each graph over `replays` rounds of replaying them all."""
        torch.cuda._sleep(SPIN_CYCLES)  # the GPU spins while the host queues the rest
        marks = [torch.cuda.Event(enable_timing=True)]
        marks[0].record()
        for _ in range(self.replays):
            for graph in graphs:
                graph.replay()
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
        marks[-1].synchronize()
        totals = [0.0] * len(graphs)
        for index in range(len(marks) - 1):
            totals[index % len(graphs)] += marks[index].elapsed_time(marks[index + 1]) / 1e3
        return [total / self.replays for total in totals]


@dataclass(frozen=True)
class ProbeTimers:
    """How this device's pieces are timed, by phase, and `shared_device`: the identity
    of a device that ranks sharing it must probe one at a time on (a GPU time-slices
    between processes: each probe would time the others' kernels too); None where
    ranks probe at once (a CPU rank's thread time is its own)."""

    decode: PieceTimer
    prefill: PieceTimer
    shared_device: str | None

    @property
    def take_turns(self) -> bool:
        return self.shared_device is not None


def probe_timers(device: torch.device, decode_graphs: bool) -> ProbeTimers:
    """The probe's one device seam. decode_graphs: the engine replays decode from CUDA
    graphs (ppruntime/stage/graphs.py `plan_decode`)."""
    if device.type != "cuda":
        eager = EagerTimer(HostClock())
        return ProbeTimers(eager, eager, shared_device=None)
    eager = EagerTimer(CudaEventClock(device))
    decode = CudaGraphTimer(device) if decode_graphs else eager
    properties = torch.cuda.get_device_properties(device)
    # the GPU itself (ranks that each see their own GPU as cuda:0 differ here)
    identity = str(getattr(properties, "uuid", "") or device)
    return ProbeTimers(decode, eager, shared_device=identity)


def _interleaved_medians(
    pieces: dict[str, Callable[[], dict[str, float]]], rounds: int
) -> dict[str, float]:
    """Median of each timed value over `rounds` rounds, each round running every piece
    once in turn: on a shared machine whose load drifts, every piece sees the same
    drift (timing one piece after the other would bias their differences)."""
    for run in pieces.values():
        run()  # warm-up: allocator, kernel compilation
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for run in pieces.values():
            for key, value in run().items():
                samples.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def weight_bytes(model: StageModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.checkpoint_parameters().values())


def measure_rank_costs(
    config: ModelConfig,
    workload: ProbeWorkload,
    dtype: torch.dtype,
    device: torch.device,
    knobs: StageKnobs | None = None,
    memory_bytes: int | None = None,
    attention_backend: AttentionBackend | None = None,
    layer_ops: LayerOps | None = None,
    cuda_graphs: bool = True,
    force_cuda_graphs: bool = False,
) -> tuple[RankCosts, StageBytes]:
    """This rank's cost of each piece (seconds per weighted microbatch) and their bytes,
    with the attention backend and layer ops the engine will run (default: torch), and
    decode timed as the engine will run it (cuda_graphs / force_cuda_graphs: the
    engine's `cuda_graphs` and PPRUNTIME_FORCE_CUDA_GRAPHS)."""

    def build(stage_index: int, layers: int) -> StageModel:
        spec = StageSpec(stage_index, 3, 0, layers)
        model = StageModel(
            config,
            spec,
            dtype=dtype,
            device=device,
            attention_backend=attention_backend,
            layer_ops=layer_ops,
        )
        return _fill_random(model)

    num_layers = min(PROBE_LAYERS, config.num_hidden_layers)
    stage, last = build(1, num_layers), build(2, 1)
    decode_plan = plan_decode(
        device, stage, workload.max_batch_size, cuda_graphs, force_graphs=force_cuda_graphs
    )
    timers = probe_timers(device, decode_plan.use_graphs)
    embedding = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
    context = max(workload.decode_context, 1)
    prefill_tokens = min(workload.max_num_tokens, PREFILL_PROBE_TOKENS)
    # a full prefill microbatch: max_batch_size prompts sharing the token budget
    prefill_seqs = min(workload.max_batch_size, prefill_tokens)
    cache_blocks = max(
        workload.max_batch_size * -(-context // workload.block_size),
        prefill_seqs + -(-prefill_tokens // workload.block_size),
    )
    cache = allocate_kv_cache(config, stage.stage, cache_blocks, workload.block_size, dtype, device)

    def pieces(
        phase: str,
        timer: PieceTimer,
        metadata: AttentionMetadata,
        positions: torch.Tensor,
        rows: int,
    ):
        tokens = positions.shape[0]
        # every input at a fixed address (a graph timer replays on them)
        states = torch.randn(tokens, config.hidden_size, dtype=dtype, device=device)
        token_ids = torch.randint(0, config.vocab_size, (tokens,), device=device)
        sampled = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)
        timed_forward = timer.forward(stage, lambda: stage(states, positions, metadata, cache))
        timed_embed = timer.piece(lambda: F.embedding(token_ids, embedding))
        timed_head = timer.piece(lambda: last.compute_logits(last.norm(sampled)).argmax(dim=-1))

        def forward() -> dict[str, float]:
            whole, layers = timed_forward()
            return {f"{phase}.forward": whole, f"{phase}.layers": layers}

        def embed() -> dict[str, float]:
            return {f"{phase}.embed": timed_embed()}

        def head() -> dict[str, float]:
            return {f"{phase}.head": timed_head()}

        return {f"{phase}.forward": forward, f"{phase}.embed": embed, f"{phase}.head": head}

    batch = workload.max_batch_size
    decode_batch = _decode_batch(batch, context, workload.block_size, device)
    prefill_batch = _prefill_batch(prefill_tokens, prefill_seqs, workload.block_size, device)
    with torch.inference_mode():
        medians = _interleaved_medians(
            {
                **pieces("decode", timers.decode, *decode_batch, rows=batch),
                # each prompt's last token is sampled
                **pieces("prefill", timers.prefill, *prefill_batch, rows=prefill_seqs),
            },
            max(workload.repeats, 1),
        )
    scale = workload.max_num_tokens / prefill_tokens
    share = workload.decode_fraction

    def mixed(key: str, prefill_scale: float = scale) -> float:
        return (
            share * medians[f"decode.{key}"]
            + (1.0 - share) * medians[f"prefill.{key}"] * prefill_scale
        )

    # what a forward costs beyond its layers (input, rotary tables, attention plan, ...)
    rest = max(mixed("forward") - mixed("layers"), 0.0)
    knobs = knobs or StageKnobs()
    costs = RankCosts(
        layer_s=mixed("layers") / num_layers,
        embed_s=mixed("embed"),
        head_s=mixed("head", prefill_scale=1.0),  # a prefill chunk samples a row a prompt
        # the delay knobs sleep / spin a fixed time in every forward: added as they are
        fixed_s=rest + knobs.delay_s + knobs.python_work_s,
        memory_bytes=memory_bytes,
    )
    element = torch.empty((), dtype=dtype).element_size()
    matrix = config.vocab_size * config.hidden_size * element
    sizes = StageBytes(
        layer=weight_bytes(stage) // num_layers,
        embed=matrix,
        head=matrix + config.hidden_size * element,
    )
    return costs, sizes
