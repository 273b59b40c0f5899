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
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

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
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, param in model.checkpoint_parameters().items():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else param.shape[0]
                values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
                param.copy_(values)
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


class _Clock:
    """Marks on the device's stream (CUDA events), or on the host: this thread's CPU
    time when torch computes on this thread alone (one torch thread, ppruntime's
    default), so that other processes sharing the cores while the probe runs do not
    count; wall time otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host_clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._host_clock()

    def seconds(self, start: object, end: object) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end) / 1e3  # type: ignore[union-attr]
        return end - start  # type: ignore[operator]

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _LayerTimes:
    """Times each decoder layer inside a whole stage forward (forward hooks), so the
    layers' cost and the rest of the forward come from the same forwards: no layer is
    timed in isolation with its weights hot in the cache."""

    def __init__(self, model: StageModel, clock: _Clock) -> None:
        self.clock = clock
        self.marks: list[tuple[object, object]] = []
        self._start: object = None
        for layer in model.layers:
            layer.register_forward_pre_hook(self._before)
            layer.register_forward_hook(self._after)

    def _before(self, module: torch.nn.Module, args: object) -> None:
        self._start = self.clock.mark()

    def _after(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.marks.append((self._start, self.clock.mark()))

    def take_seconds(self) -> float:
        """Sum of the layer times marked since the last call (after a sync)."""
        total = sum(self.clock.seconds(start, end) for start, end in self.marks)
        self.marks.clear()
        return total


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
) -> tuple[RankCosts, StageBytes]:
    """This rank's cost of each piece (seconds per weighted microbatch) and their bytes,
    with the attention backend and layer ops the engine will run (default: torch)."""

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
    clock = _Clock(device)
    layer_times = _LayerTimes(stage, clock)
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

    def pieces(phase: str, metadata: AttentionMetadata, positions: torch.Tensor, rows: int):
        tokens = positions.shape[0]
        states = torch.randn(tokens, config.hidden_size, dtype=dtype, device=device)
        token_ids = torch.randint(0, config.vocab_size, (tokens,), device=device)
        sampled = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)

        def timed(run: Callable[[], object]) -> float:
            start = clock.mark()
            run()
            end = clock.mark()
            clock.synchronize()
            return clock.seconds(start, end)

        def forward() -> dict[str, float]:
            layer_times.take_seconds()
            whole = timed(lambda: stage(states, positions, metadata, cache))
            return {f"{phase}.forward": whole, f"{phase}.layers": layer_times.take_seconds()}

        def embed() -> dict[str, float]:
            return {f"{phase}.embed": timed(lambda: F.embedding(token_ids, embedding))}

        def head() -> dict[str, float]:
            run = lambda: last.compute_logits(last.norm(sampled)).argmax(dim=-1)
            return {f"{phase}.head": timed(run)}

        return {f"{phase}.forward": forward, f"{phase}.embed": embed, f"{phase}.head": head}

    batch = workload.max_batch_size
    decode_batch = _decode_batch(batch, context, workload.block_size, device)
    prefill_batch = _prefill_batch(prefill_tokens, prefill_seqs, workload.block_size, device)
    with torch.inference_mode():
        medians = _interleaved_medians(
            {
                **pieces("decode", *decode_batch, rows=batch),
                **pieces("prefill", *prefill_batch, rows=prefill_seqs),  # each prompt's last
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
