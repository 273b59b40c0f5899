"""Measure what the pieces of a stage cost on this rank (for `--layer-partition auto`).

Each rank builds throwaway models of the configured shape with random weights on its
own device and dtype: a middle stage of one and of a few decoder layers (their
difference gives one layer's cost, the rest is the per-forward overhead), a first stage (the
embedding) and the last stage's head (final norm, LM head, greedy sampling). Each is
timed on a decode microbatch of `max_batch_size` sequences and on a prefill chunk of
`max_num_tokens` tokens; the two are mixed by the expected share of decode
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

PREFILL_PROBE_TOKENS = 128
PROBE_LAYERS = 5  # the layer cost is (t(PROBE_LAYERS) - t(1)) / (PROBE_LAYERS - 1)
MIN_PROBE_SECONDS = 0.05  # per timed piece: short pieces are repeated until this long
MAX_REPEATS = 50


@dataclass(frozen=True)
class ProbeWorkload:
    """The representative microbatches the pieces are timed on."""

    max_batch_size: int
    max_num_tokens: int
    block_size: int
    decode_context: int = 256  # context length of each decode sequence
    decode_fraction: float = 0.9  # share of microbatches that are decode steps
    repeats: int = 3

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
    tokens: int, block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """One sequence prefilling `tokens` tokens from position 0."""
    blocks = -(-tokens // block_size)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int64, device=device),
        seq_lens=torch.tensor([tokens], dtype=torch.int64, device=device),
        block_table=torch.arange(blocks, dtype=torch.int32).view(1, blocks).to(device),
        slot_mapping=torch.arange(tokens, dtype=torch.int64, device=device),
        max_query_len=tokens,
        max_seq_len=tokens,
    )
    return metadata, torch.arange(tokens, dtype=torch.int64, device=device)


def _median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `run`: at least `repeats` runs, more for short ones."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        start = time.perf_counter()
        run()  # warm-up: allocator, kernel compilation
        synchronize()
        first = time.perf_counter() - start
        count = min(max(repeats, math.ceil(MIN_PROBE_SECONDS / max(first, 1e-6))), MAX_REPEATS)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            run()
            synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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

    extra_layers = min(PROBE_LAYERS, config.num_hidden_layers) - 1
    one, many, last = build(1, 1), build(1, 1 + extra_layers), build(2, 1)
    embedding = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
    context = max(workload.decode_context, 1)
    # A prefill chunk costs about its token count in matmuls: time a short one, scale up.
    prefill_tokens = min(workload.max_num_tokens, PREFILL_PROBE_TOKENS)
    cache_blocks = max(
        workload.max_batch_size * -(-context // workload.block_size),
        -(-prefill_tokens // workload.block_size),
    )
    cache = allocate_kv_cache(config, many.stage, cache_blocks, workload.block_size, dtype, device)

    def timed(metadata: AttentionMetadata, positions: torch.Tensor, rows: int) -> dict:
        tokens = positions.shape[0]
        states = torch.randn(tokens, config.hidden_size, dtype=dtype, device=device)
        token_ids = torch.randint(0, config.vocab_size, (tokens,), device=device)
        sampled = torch.randn(rows, config.hidden_size, dtype=dtype, device=device)

        def forward(model: StageModel) -> Callable[[], object]:
            return lambda: model(states, positions, metadata, cache[: model.stage.num_layers])

        def head() -> object:
            return last.compute_logits(last.norm(sampled)).argmax(dim=-1)

        repeats = workload.repeats
        return {
            "one": _median_seconds(forward(one), repeats, device),
            "many": _median_seconds(forward(many), repeats, device),
            "embed": _median_seconds(lambda: F.embedding(token_ids, embedding), repeats, device),
            "head": _median_seconds(head, repeats, device),
        }

    batch = workload.max_batch_size
    decode = timed(*_decode_batch(batch, context, workload.block_size, device), rows=batch)
    prefill = timed(*_prefill_batch(prefill_tokens, workload.block_size, device), rows=1)
    scale = workload.max_num_tokens / prefill_tokens
    share = workload.decode_fraction

    def mixed(key: str, prefill_scale: float = scale) -> float:
        return share * decode[key] + (1.0 - share) * prefill[key] * prefill_scale

    layer = max((mixed("many") - mixed("one")) / extra_layers, 0.0)
    knobs = knobs or StageKnobs()
    costs = RankCosts(
        layer_s=layer,
        embed_s=mixed("embed"),
        head_s=mixed("head", prefill_scale=1.0),  # a prefill chunk samples one row
        fixed_s=max(mixed("one") - layer, 0.0) + knobs.delay_s + knobs.python_work_s,
        memory_bytes=memory_bytes,
    )
    element = torch.empty((), dtype=dtype).element_size()
    matrix = config.vocab_size * config.hidden_size * element
    sizes = StageBytes(
        layer=weight_bytes(one), embed=matrix, head=matrix + config.hidden_size * element
    )
    return costs, sizes
