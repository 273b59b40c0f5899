"""The triton attention backend (KV store, paged attention, split-KV decode) against the
torch backend, and a whole checkpoint through `ppruntime generate` with it.

Without a GPU the kernels run interpreted on CPU tensors (TRITON_INTERPRET=1, set here
before triton is imported: it is read when a kernel is defined); with one they are
compiled and run on CUDA tensors. The interpreter is slow: shapes are tiny.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from launching import REPO_ROOT, describe, mpi_env, start_process, wait_all
from model_fixtures import PagedBatches, load_reference_model, make_tiny_checkpoint
from reference_compare import compare_greedy, hf_greedy_reference

from ppruntime.config import ConfigError, EngineConfig
from ppruntime.kernels.kv_store import store_kv
from ppruntime.kernels.paged_attention import (
    PREFILL_KERNEL_ENV,
    PREFILL_VARIANTS,
    AttentionLaunch,
    decode_launch,
    paged_attention,
    prefill_launch,
)
from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends import select_attention_backend
from ppruntime.model.backends.torch_backend import write_kv

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TORCH = select_attention_backend("torch", "cpu")
TRITON = select_attention_backend("triton", DEVICE)
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
}

# prefill only; prefill chunks with cached prefixes mixed with decode tokens; decode only
STEPS = [
    [(0, 33), (1, 6)],  # 33 tokens x 4 heads a group fill 128-row tiles
    [(1, 11), (0, 1), (2, 3)],
    [(2, 1), (0, 1), (1, 1)],
]


def _on(device, metadata: AttentionMetadata) -> AttentionMetadata:
    fields = {
        name: getattr(metadata, name).to(device)
        for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping")
    }
    rows = metadata.block_table_rows
    return AttentionMetadata(
        **fields,
        max_query_len=metadata.max_query_len,
        max_seq_len=metadata.max_seq_len,
        block_table_rows=rows.to(device) if rows is not None else None,
    )


def _with_persistent_table(metadata: AttentionMetadata, num_rows: int) -> AttentionMetadata:
    """The engine's layout: sequence b's blocks are row rows[b] of a wider, shuffled table."""
    rows = torch.randperm(num_rows, generator=torch.Generator().manual_seed(7))
    rows = rows[: metadata.num_seqs].to(torch.int64)
    table = torch.full((num_rows, metadata.block_table.shape[1]), 10**6, dtype=torch.int32)
    table[rows] = metadata.block_table
    metadata.block_table, metadata.block_table_rows = table, rows
    return metadata


def _run_steps(
    hq, hkv, head_dim, block_size, window, dtype, steps=STEPS, table_rows=None, backend=TRITON
):
    """Every step through both backends, each on its own cache; compare out and cache."""
    generator = torch.Generator().manual_seed(hq * 1000 + head_dim + block_size)
    num_blocks = 48
    paging = PagedBatches(num_blocks, block_size, seed=block_size)
    reference_cache = torch.zeros(2, num_blocks, block_size, hkv, head_dim, dtype=dtype)
    cache = reference_cache.to(DEVICE)
    plans = []
    for step in steps:
        metadata, positions = paging.step(step)
        if table_rows is not None:
            metadata = _with_persistent_table(metadata, table_rows)
        total = sum(count for _, count in step)
        q = torch.randn(total, hq, head_dim, generator=generator).to(dtype)
        k = torch.randn(total, hkv, head_dim, generator=generator).to(dtype)
        v = torch.randn(total, hkv, head_dim, generator=generator).to(dtype)
        scale = head_dim**-0.5
        plan = TORCH.plan(metadata, positions, block_size)
        expected = TORCH.forward(q, k, v, reference_cache, plan, scale, window)
        device_metadata = _on(DEVICE, metadata)
        plan = backend.plan(device_metadata, positions.to(DEVICE), block_size)
        plans.append(plan)
        out = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, plan, scale, window)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])
        assert torch.equal(cache.cpu(), reference_cache), "the KV store wrote elsewhere"
    return plans


@pytest.mark.parametrize(
    "hq, hkv, head_dim, block_size, window, dtype",
    [
        (2, 2, 64, 16, None, torch.float32),  # GQA 1
        (4, 2, 80, 16, 7, torch.bfloat16),  # GQA 2, non-power-of-2 head_dim, window
        (4, 1, 96, 5, None, torch.float32),  # GQA 4, odd block size
        (4, 1, 128, 8, 5, torch.float16),
        (8, 2, 24, 3, None, torch.bfloat16),  # qwen3-test-like head_dim, tiny blocks
    ],
)
def test_mixed_and_decode_batches_match_torch(hq, hkv, head_dim, block_size, window, dtype):
    plans = _run_steps(hq, hkv, head_dim, block_size, window, dtype)
    assert [plan.decode for plan in plans] == [False, False, True]


def test_block_table_rows_of_a_persistent_table():
    _run_steps(4, 2, 64, 16, None, torch.float32, table_rows=9)


def test_batch_one_prefill_then_decode():
    _run_steps(4, 2, 64, 16, None, torch.float32, steps=[[(0, 37)], [(0, 1)], [(0, 1)]])


def _decode_case(
    contexts, block_size, hq, hkv, head_dim, dtype, table_rows=None, random_cache=False
):
    """Sequences that already hold `contexts[b] - 1` tokens, decoding one each (the rest
    of the cache zeros, or random: then a slot left unwritten shows)."""
    paging = PagedBatches(64, block_size, seed=2)
    generator = torch.Generator().manual_seed(5)
    cache = torch.zeros(2, 64, block_size, hkv, head_dim, dtype=dtype)
    if random_cache:
        cache.copy_(torch.randn(cache.shape, generator=generator))
    prefill, _ = paging.step([(seq, length - 1) for seq, length in enumerate(contexts)])
    keys = torch.randn(2, prefill.slot_mapping.shape[0], hkv, head_dim, generator=generator)
    write_kv(keys[0].to(dtype), keys[1].to(dtype), cache, prefill.slot_mapping)
    metadata, positions = paging.step([(seq, 1) for seq in range(len(contexts))])
    if table_rows is not None:
        metadata = _with_persistent_table(metadata, table_rows)
    new = torch.randn(3, len(contexts), max(hq, hkv), head_dim, generator=generator).to(dtype)
    return metadata, positions, cache, new[0, :, :hq], new[1, :, :hkv], new[2, :, :hkv]


@pytest.mark.parametrize(
    "contexts, window, dtype, table_rows, target_programs, min_keys",
    [
        ([70, 33, 5], None, torch.float32, None, 24, 16),  # 4 splits; a 5-key one fills 1
        # 48 keys a split at least: 70 keys use 2 of the 4 splits, 33 and 5 one (unmerged)
        ([70, 33, 5], None, torch.float32, None, 24, 48),
        ([70, 40], 20, torch.bfloat16, 5, 16, 16),  # the splits share the window only
        ([300], None, torch.float32, 3, 64, 16),  # batch 1, 20 splits: merged in 2 chunks
    ],
)
def test_split_kv_decode_matches_torch(
    contexts, window, dtype, table_rows, target_programs, min_keys
):
    hq, hkv, head_dim, block_size = 4, 2, 64, 8
    metadata, positions, cache, q, k, v = _decode_case(
        contexts, block_size, hq, hkv, head_dim, dtype, table_rows
    )
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, block_size), 0.125, window
    )
    launch = decode_launch(
        len(contexts),
        hkv,
        320,
        target_programs,
        block_n=16,
        min_keys_per_split=min_keys,
        fused_store=False,  # store_kv first (test_decode_launch_stores_kv_... : fused)
    )
    assert launch.num_splits >= 4
    device_metadata = _on(DEVICE, metadata)
    cache = cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), cache, device_metadata.slot_mapping)
    out = paged_attention(
        q.to(DEVICE),
        cache,
        device_metadata.query_start_loc,
        device_metadata.seq_lens,
        device_metadata.block_table,
        0.125,
        launch,
        block_table_rows=device_metadata.block_table_rows,
        sliding_window=window,
    )
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])
    assert torch.equal(cache.cpu(), reference_cache)


def _attention_args(metadata: AttentionMetadata, launch: AttentionLaunch) -> tuple:
    """paged_attention's positional arguments after q and the cache (scale 0.125)."""
    return (metadata.query_start_loc, metadata.seq_lens, metadata.block_table, 0.125, launch)


def _with_padded_rows(metadata: AttentionMetadata, count: int) -> AttentionMetadata:
    """A captured graph's padding: rows of seq_len 0 and slot -1, one query each."""
    num_seqs = metadata.num_seqs
    return AttentionMetadata(
        query_start_loc=torch.arange(num_seqs + count + 1, dtype=torch.int32),
        seq_lens=torch.cat([metadata.seq_lens, torch.zeros(count, dtype=torch.int32)]),
        block_table=torch.cat(
            [metadata.block_table, metadata.block_table[:1].expand(count, -1)]
        ),  # the first real row's blocks, as StepInputPool pads
        slot_mapping=torch.cat([metadata.slot_mapping, torch.full((count,), -1)]),
        max_query_len=1,
        max_seq_len=metadata.max_seq_len,
    )


# the decode launch storing the new token's k / v itself (slot_mapping given): block size
# 8 and 16-key tiles put the new keys of contexts 16 / 17 / 8 / 9 at the end / start of
# a tile or a block, and of 1 at position 0
FUSED_STORE_CASES = {
    # contexts, hq, hkv, head_dim, window, dtype, target programs, min split keys, table
    # rows, padded rows
    "splits-fp32": ([70, 33, 5, 17], 4, 2, 64, None, torch.float32, 32, 16, None, 0),
    # 48 keys a split at least: 70 keys use 2 of the splits, the others one (unmerged)
    "split-floor-bf16": ([70, 33, 16, 9], 4, 2, 64, None, torch.bfloat16, 32, 48, 11, 0),
    "window-splits-bf16": ([70, 40, 8], 4, 2, 80, 20, torch.bfloat16, 24, 16, 5, 0),
    "one-split-gqa4-fp32": ([17, 16, 1], 4, 1, 96, None, torch.float32, 1, 16, None, 0),
    "padded-gqa1-fp32": ([20, 9], 2, 2, 64, None, torch.float32, 24, 16, None, 2),
    "padded-one-split-bf16": ([33, 8], 8, 2, 24, 6, torch.bfloat16, 1, 16, None, 3),
}


@pytest.mark.parametrize("case", list(FUSED_STORE_CASES.values()), ids=list(FUSED_STORE_CASES))
def test_decode_launch_stores_kv_as_store_kv_does(case):
    """The fused store leaves the cache bit for bit as store_kv does, and the output is
    today's (store_kv, then the same launch reading the new key from the cache), also
    when the keys are split over programs and with padded rows (slot -1: nothing)."""
    contexts, hq, hkv, head_dim, window, dtype, programs, min_keys, table_rows, padded = case
    block_size = 8
    metadata, positions, cache, q, k, v = _decode_case(
        contexts, block_size, hq, hkv, head_dim, dtype, table_rows, random_cache=True
    )
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, block_size), 0.125, window
    )
    launch = decode_launch(
        len(contexts) + padded, hkv, 160, programs, block_n=16, min_keys_per_split=min_keys
    )
    assert launch.fused_store and (launch.num_splits > 1) == (programs > 1)
    if padded:
        metadata = _with_padded_rows(metadata, padded)
        extra = torch.full((padded, max(hq, hkv), head_dim), 1e4, dtype=dtype)
        q, k, v = (torch.cat([x, extra[:, : x.shape[1]]]) for x in (q, k, v))
    device_metadata = _on(DEVICE, metadata)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    args = _attention_args(device_metadata, launch)
    options = {"block_table_rows": device_metadata.block_table_rows, "sliding_window": window}
    separate_cache = cache.clone().to(DEVICE)
    store_kv(k, v, separate_cache, device_metadata.slot_mapping)
    separate_args = _attention_args(device_metadata, replace(launch, fused_store=False))
    separate = paged_attention(q, separate_cache, *separate_args, **options)
    fused_cache = cache.clone().to(DEVICE)  # (.to of a CPU tensor is the tensor)
    fused = paged_attention(
        q,
        fused_cache,
        *args,
        **options,
        k_new=k,
        v_new=v,
        slot_mapping=device_metadata.slot_mapping,
    )
    assert torch.equal(fused_cache, separate_cache), "the fused store differs from store_kv"
    assert torch.equal(fused_cache.cpu(), reference_cache)
    assert torch.equal(fused, separate), "the fused launch's output differs from today's"
    real = len(contexts)
    torch.testing.assert_close(fused[:real].cpu(), expected, **TOLERANCE[dtype])
    assert torch.equal(fused[real:], torch.zeros_like(fused[real:]))  # padded rows


def test_fused_store_attends_to_k_new_not_to_the_slot_it_writes():
    """Whatever the new key's cache position holds during the launch, the split that owns
    it (not split 0: 70 keys fill 3 splits of 32, 20 keys 2 of 16) attends to k_new / v_new:
    with the slots sent to a spare block, the real positions stale, the output is still
    store_kv + attention's, and the spare slots hold what store_kv writes there."""
    block_size = 8
    metadata, _, cache, q, k, v = _decode_case(
        [70, 20, 9], block_size, 4, 2, 64, torch.float32, random_cache=True
    )
    launch = decode_launch(3, 2, 160, 24, block_n=16, min_keys_per_split=16)
    assert launch.num_splits == 4
    spare = next(b for b in range(1, 64) if not (metadata.block_table == b).any())
    spare_slots = spare * block_size + torch.arange(3)
    device_metadata = _on(DEVICE, metadata)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    separate_args = _attention_args(device_metadata, replace(launch, fused_store=False))
    stored_cache = cache.clone().to(DEVICE)
    store_kv(k, v, stored_cache, device_metadata.slot_mapping)
    expected = paged_attention(q, stored_cache, *separate_args)
    stale = paged_attention(q, cache.clone().to(DEVICE), *separate_args)
    assert not torch.equal(expected, stale)
    expected_cache = cache.clone().to(DEVICE)
    store_kv(k, v, expected_cache, spare_slots.to(DEVICE))
    fused_cache = cache.clone().to(DEVICE)
    out = paged_attention(
        q,
        fused_cache,
        *_attention_args(device_metadata, launch),
        k_new=k,
        v_new=v,
        slot_mapping=spare_slots.to(DEVICE),
    )
    assert torch.equal(out, expected)
    assert torch.equal(fused_cache, expected_cache)


def test_fused_store_needs_a_decode_launch_and_the_new_keys():
    paging = PagedBatches(8, 8)
    metadata, _ = paging.step([(0, 5)])
    q = torch.zeros(5, 2, 64)
    cache = torch.zeros(2, 8, 8, 2, 64)
    args = (metadata.query_start_loc, metadata.seq_lens, metadata.block_table, 0.125)
    slots = metadata.slot_mapping
    mixed = AttentionLaunch(16, 16, fused_store=True)
    with pytest.raises(ValueError, match="fused_store needs a decode-only launch"):
        paged_attention(q, cache, *args, mixed, k_new=q, v_new=q, slot_mapping=slots)
    decode = AttentionLaunch(16, 16, one_program_per_seq=True, fused_store=True)
    with pytest.raises(ValueError, match="fused_store needs this step's k_new and v_new"):
        paged_attention(q, cache, *args, decode, slot_mapping=slots)
    with pytest.raises(ValueError, match="fused_store needs this step's slot_mapping"):
        paged_attention(q, cache, *args, decode, k_new=q, v_new=q)
    with pytest.raises(ValueError, match="slot_mapping is for fused_store launches"):
        paged_attention(q, cache, *args, replace(decode, fused_store=False), slot_mapping=slots)
    k = torch.zeros(5, 2, 32)
    with pytest.raises(ValueError, match=r"must both be \[5, Hkv, 64\]"):
        paged_attention(q, cache, *args, decode, k_new=k, v_new=k, slot_mapping=slots)
    k = torch.zeros(5, 1, 64)
    with pytest.raises(ValueError, match="k_new and v_new have 1 KV heads, the cache 2"):
        paged_attention(q, cache, *args, decode, k_new=k, v_new=k, slot_mapping=slots)
    with pytest.raises(ValueError, match=r"slot_mapping \(4,\) must be \[5\]"):
        paged_attention(q, cache, *args, decode, k_new=q, v_new=q, slot_mapping=slots[:4])


def test_backend_decode_step_launches_no_separate_store(monkeypatch):
    """Through the backend with PPRUNTIME_FUSED_KV_STORE=1: decode steps store inside the
    attention launch (store_kv is not called), mixed steps still call it; every step's
    cache and output match torch. Unset (the default until timed on a GPU), decode steps
    call store_kv too."""
    from ppruntime.model.backends import triton_backend

    calls = []

    def counted_store(*args):
        calls.append(args[0].shape[0])
        store_kv(*args)

    monkeypatch.setattr(triton_backend, "store_kv", counted_store)
    decode_steps = STEPS + [[(2, 1), (0, 1)]]
    monkeypatch.delenv("PPRUNTIME_FUSED_KV_STORE", raising=False)
    plans = _run_steps(4, 2, 64, 8, None, torch.bfloat16, steps=decode_steps)
    assert not any(plan.launch.fused_store for plan in plans)
    assert calls == [39, 15, 3, 2], "by default a decode step calls store_kv"
    calls.clear()
    monkeypatch.setenv("PPRUNTIME_FUSED_KV_STORE", "1")
    fused = select_attention_backend("triton", DEVICE)
    plans = _run_steps(4, 2, 64, 8, None, torch.bfloat16, steps=decode_steps, backend=fused)
    assert [plan.decode for plan in plans] == [False, False, True, True]
    assert all(plan.launch.fused_store == plan.decode for plan in plans)
    assert calls == [39, 15], "decode steps must not call store_kv"
    monkeypatch.setenv("PPRUNTIME_FUSED_KV_STORE", "sometimes")
    with pytest.raises(ConfigError, match="PPRUNTIME_FUSED_KV_STORE='sometimes'"):
        select_attention_backend("triton", DEVICE)
    # a decode launch without the fused store (a tuning choice): store_kv runs first
    metadata, positions, cache, q, k, v = _decode_case([20, 9], 8, 4, 2, 64, torch.float32)
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, 8), 0.125, None
    )
    plan = TRITON.plan(_on(DEVICE, metadata), positions.to(DEVICE), 8)
    plan.launch = replace(plan.launch_for(2, 2, 64, torch.float32), fused_store=False)
    cache = cache.to(DEVICE)
    out = TRITON.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, plan, 0.125, None)
    assert calls == [39, 15, 2]
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[torch.float32])
    assert torch.equal(cache.cpu(), reference_cache)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU (the interpreter runs eagerly)")
def test_fused_store_replays_from_a_cuda_graph():
    """The fused decode launch captured once, replayed for two steps whose q / k / v,
    slots, lengths and tables were copied into the captured buffers: cache and output as
    store_kv + attention give them eagerly."""
    hq, hkv, head_dim, block_size, dtype = 8, 2, 128, 16, torch.bfloat16
    paging = PagedBatches(64, block_size, seed=4)
    generator = torch.Generator().manual_seed(9)
    cache = torch.randn(2, 64, block_size, hkv, head_dim, generator=generator).to(dtype)
    contexts = [300, 37, 16, 1]
    paging.step([(seq, length - 1) for seq, length in enumerate(contexts) if length > 1])
    steps = [paging.step([(seq, 1) for seq in range(len(contexts))])[0] for _ in range(2)]
    width = max(step.block_table.shape[1] for step in steps)
    launch = decode_launch(len(contexts), hkv, width * block_size, 64, min_keys_per_split=64)
    assert launch.fused_store and launch.num_splits > 1

    def new_inputs():
        return [
            torch.randn(len(contexts), heads, head_dim, generator=generator).to(dtype).cuda()
            for heads in (hq, hkv, hkv)
        ]

    def padded_table(step):
        table = torch.zeros(len(contexts), width, dtype=torch.int32)
        table[:, : step.block_table.shape[1]] = step.block_table
        return table.cuda()

    buffers = {
        "q": torch.zeros(len(contexts), hq, head_dim, dtype=dtype, device="cuda"),
        "k": torch.zeros(len(contexts), hkv, head_dim, dtype=dtype, device="cuda"),
        "v": torch.zeros(len(contexts), hkv, head_dim, dtype=dtype, device="cuda"),
        "query_start_loc": torch.arange(len(contexts) + 1, dtype=torch.int32, device="cuda"),
        "seq_lens": torch.zeros(len(contexts), dtype=torch.int32, device="cuda"),
        "block_table": torch.zeros(len(contexts), width, dtype=torch.int32, device="cuda"),
        "slot_mapping": torch.full((len(contexts),), -1, dtype=torch.int64, device="cuda"),
    }
    graph_cache = cache.cuda()

    def fused():
        return paged_attention(
            buffers["q"],
            graph_cache,
            buffers["query_start_loc"],
            buffers["seq_lens"],
            buffers["block_table"],
            head_dim**-0.5,
            launch,
            k_new=buffers["k"],
            v_new=buffers["v"],
            slot_mapping=buffers["slot_mapping"],
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused()  # compile outside the capture (slots -1, lengths 0: writes nothing)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = fused()
    eager_cache = cache.cuda()
    for step in steps:
        q, k, v = new_inputs()
        table = padded_table(step)
        for name, value in (("q", q), ("k", k), ("v", v), ("block_table", table)):
            buffers[name].copy_(value)
        buffers["seq_lens"].copy_(step.seq_lens)
        buffers["slot_mapping"].copy_(step.slot_mapping)
        graph.replay()
        store_kv(k, v, eager_cache, step.slot_mapping.cuda())
        expected = paged_attention(
            q,
            eager_cache,
            buffers["query_start_loc"],
            step.seq_lens.cuda(),
            table,
            head_dim**-0.5,
            replace(launch, fused_store=False),
        )
        assert torch.equal(graph_cache, eager_cache)
        assert torch.equal(graph_out, expected)


def test_backend_plan_splits_a_long_decode():
    """The backend's own plan for one long sequence: several splits, grid from the table."""
    metadata, positions, cache, q, k, v = _decode_case([300], 16, 4, 2, 64, torch.float32)
    width = metadata.block_table.shape[1]
    plan = TRITON.plan(_on(DEVICE, metadata), positions.to(DEVICE), 16)
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, 16), 0.125, None
    )
    cache = cache.to(DEVICE)
    out = TRITON.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache, plan, 0.125, None)
    assert plan.decode and plan.max_context_len == width * 16
    assert plan.launch.num_splits > 1
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[torch.float32])


# 16-key tiles over blocks of 5 (each key looked up), 8 (a tile spans whole blocks) and
# 32 (a tile lies inside one block)
@pytest.mark.parametrize("block_size", [5, 8, 32])
@pytest.mark.parametrize("window", [None, 40], ids=["causal", "window-40"])
@pytest.mark.parametrize(
    "launch",
    [
        AttentionLaunch(block_m=16, block_n=16, causal_tiling=True),
        AttentionLaunch(block_m=16, block_n=16),
    ],
    ids=["causal-tiling", "legacy"],
)
def test_prefill_kernels_match_torch_over_every_kind_of_tile(launch, window, block_size):
    """A chunk over a cached prefix (70 keys), a decode token and a fresh prompt: under
    causal tiling the query blocks have masked window-edge tiles, unmasked tiles and
    masked diagonal tiles (window 40 over 8-token query blocks leaves room for all
    three); the legacy loop masks every tile."""
    _check_every_kind_of_tile(launch, window, block_size)


# the candidate prefill kernels (scripts/sweep_prefill_attention.py times them): the
# chunk's own keys read from k / v (plain loads, TMA descriptors) after the prefix from
# the cache, one query head a program, q pre-scaled, lazy rescaling
CANDIDATES = [name for name in PREFILL_VARIANTS if name != "tiled"]


@pytest.mark.parametrize("window", [None, 40], ids=["causal", "window-40"])
@pytest.mark.parametrize("variant", CANDIDATES)
def test_prefill_candidates_match_torch_over_every_kind_of_tile(variant, window):
    launch = AttentionLaunch(block_m=16, block_n=16, causal_tiling=True)
    _check_every_kind_of_tile(replace(launch, **PREFILL_VARIANTS[variant]), window, 8)


# head_dim 64 / 80 / 96 / 128 / 24, GQA 1 / 2 / 4, windows, odd block sizes, each dtype
CANDIDATE_SHAPES = [
    (4, 2, 80, 16, 7, torch.bfloat16),
    (4, 1, 128, 8, 5, torch.float16),
    (2, 2, 64, 16, None, torch.float32),
    (4, 1, 96, 5, None, torch.bfloat16),
    (8, 2, 24, 3, None, torch.float16),
]


@pytest.mark.parametrize(
    "variant, shape", list(zip(CANDIDATES, itertools.cycle(CANDIDATE_SHAPES))), ids=CANDIDATES
)
def test_prefill_candidates_through_the_backend(monkeypatch, variant, shape):
    """$PPRUNTIME_TRITON_PREFILL picks the candidate for the mixed steps (prefill chunks
    over cached prefixes with decode tokens); decode keeps its own kernel."""
    monkeypatch.setenv(PREFILL_KERNEL_ENV, variant)
    plans = _run_steps(*shape)
    assert [plan.decode for plan in plans] == [False, False, True]
    for field, value in PREFILL_VARIANTS[variant].items():
        assert getattr(plans[0].launch, field) == value, field


def test_new_kv_launches_need_the_new_keys():
    paging = PagedBatches(8, 8)
    metadata, _ = paging.step([(0, 5)])
    q = torch.zeros(5, 2, 64)
    cache = torch.zeros(2, 8, 8, 2, 64)
    launch = AttentionLaunch(16, 16, causal_tiling=True, new_kv="pointer")
    args = (metadata.query_start_loc, metadata.seq_lens, metadata.block_table, 0.125)
    with pytest.raises(ValueError, match="needs this step's k_new and v_new"):
        paged_attention(q, cache, *args, launch)
    with pytest.raises(ValueError, match="new_kv='tma'"):
        paged_attention(q, cache, *args, replace(launch, new_kv="tma"))
    with pytest.raises(ValueError, match="needs causal_tiling"):
        paged_attention(q, cache, *args, replace(launch, causal_tiling=False), k_new=q, v_new=q)


def _check_every_kind_of_tile(launch, window, block_size):
    hq, hkv, head_dim, dtype = 4, 2, 64, torch.float32
    paging = PagedBatches(64, block_size, seed=3)
    generator = torch.Generator().manual_seed(11)
    cache = torch.zeros(2, 64, block_size, hkv, head_dim, dtype=dtype)
    cached, _ = paging.step([(0, 40), (1, 50)])
    keys = torch.randn(2, cached.slot_mapping.shape[0], hkv, head_dim, generator=generator)
    write_kv(keys[0], keys[1], cache, cached.slot_mapping)
    metadata, positions = paging.step([(0, 30), (1, 1), (2, 25)])
    total = metadata.slot_mapping.shape[0]
    q = torch.randn(total, hq, head_dim, generator=generator)
    k, v = torch.randn(2, total, hkv, head_dim, generator=generator).unbind(0)
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, block_size), 0.125, window
    )
    device_metadata = _on(DEVICE, metadata)
    cache = cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), cache, device_metadata.slot_mapping)
    out = paged_attention(
        q.to(DEVICE),
        cache,
        device_metadata.query_start_loc,
        device_metadata.seq_lens,
        device_metadata.block_table,
        0.125,
        launch,
        sliding_window=window,
        k_new=k.to(DEVICE),
        v_new=v.to(DEVICE),
    )
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])


def test_prefill_kernel_choice_and_its_error(monkeypatch):
    monkeypatch.delenv(PREFILL_KERNEL_ENV, raising=False)
    default = prefill_launch(torch.bfloat16, 4096, 4)
    assert default.causal_tiling and (default.block_m, default.block_n) == (128, 128)
    assert default.new_kv == "descriptor" and default.table_per_block  # new-kv-tma-table
    assert prefill_launch(torch.bfloat16, 4096, 4, kernel="new-kv-tma-table") == default
    tiled = prefill_launch(torch.bfloat16, 4096, 4, kernel="tiled")
    assert tiled.causal_tiling and tiled.new_kv == "cache" and not tiled.table_per_block
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "legacy")
    legacy = prefill_launch(torch.bfloat16, 4096, 4)
    assert not legacy.causal_tiling and (legacy.block_m, legacy.block_n) == (128, 64)
    monkeypatch.setenv(PREFILL_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="PPRUNTIME_TRITON_PREFILL='fast'.*tiled, legacy"):
        prefill_launch(torch.bfloat16, 4096, 4)
    with pytest.raises(ConfigError, match="PPRUNTIME_TRITON_PREFILL='fast'"):
        select_attention_backend("triton", DEVICE)
    assert select_attention_backend("torch", DEVICE).name == "torch"  # triton's knob only
    decode = AttentionLaunch(16, 16, one_program_per_seq=True, causal_tiling=True)
    q = torch.zeros(1, 2, 64)
    cache = torch.zeros(2, 4, 8, 2, 64)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="causal_tiling"):
        paged_attention(q, cache, torch.arange(2), one, one[None], 0.125, decode)


@pytest.mark.parametrize(
    "launch",
    [
        AttentionLaunch(block_m=16, block_n=16),
        AttentionLaunch(16, 16, one_program_per_seq=True, num_splits=3),
        # 16 keys a split at least: the 9-key row is written by its one split, unmerged
        AttentionLaunch(16, 16, one_program_per_seq=True, num_splits=3, min_split_keys=16),
    ],
    ids=["unified", "split-kv", "split-kv-floor"],
)
def test_padded_rows_write_nothing_and_give_zeros(launch):
    """Padded rows as a captured graph has them: seq_len 0, slot -1, one query each."""
    hq, hkv, head_dim, block_size = 4, 2, 64, 8
    metadata, positions, cache, q, k, v = _decode_case(
        [20, 9], block_size, hq, hkv, head_dim, torch.float32
    )
    padded = AttentionMetadata(
        query_start_loc=torch.arange(5, dtype=torch.int32),
        seq_lens=torch.cat([metadata.seq_lens, torch.zeros(2, dtype=torch.int32)]),
        block_table=torch.cat([metadata.block_table, torch.zeros_like(metadata.block_table)]),
        slot_mapping=torch.cat([metadata.slot_mapping, torch.full((2,), -1)]),
        max_query_len=1,
        max_seq_len=20,
    )
    extra = torch.full((2, hkv, head_dim), 1e4)
    k_all, v_all = torch.cat([k, extra]), torch.cat([v, extra])
    q_all = torch.cat([q, torch.ones(2, hq, head_dim)])
    reference_cache = cache.clone()
    expected = TORCH.forward(
        q, k, v, reference_cache, TORCH.plan(metadata, positions, block_size), 0.125, None
    )
    device_metadata = _on(DEVICE, padded)
    cache = cache.to(DEVICE)
    store_kv(k_all.to(DEVICE), v_all.to(DEVICE), cache, device_metadata.slot_mapping)
    assert torch.equal(cache.cpu(), reference_cache), "a padded slot wrote into the cache"
    out = paged_attention(
        q_all.to(DEVICE),
        cache,
        device_metadata.query_start_loc,
        device_metadata.seq_lens,
        device_metadata.block_table,
        0.125,
        launch,
    ).cpu()
    torch.testing.assert_close(out[:2], expected, **TOLERANCE[torch.float32])
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


def test_kv_store_matches_write_kv_and_skips_padding():
    cache = torch.randn(2, 6, 5, 3, 80)
    slots = torch.tensor([7, -1, 0, 29, -1, 13])
    k, v = torch.randn(2, 6, 3, 80).unbind(0)
    expected = cache.clone()
    keep = slots >= 0
    write_kv(k[keep], v[keep], expected, slots[keep])
    on_device = cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), on_device, slots.to(DEVICE))
    assert torch.equal(on_device.cpu(), expected)


def test_narrow_block_table_is_an_error():
    paging = PagedBatches(16, 4)
    metadata, positions = paging.step([(0, 9)])
    metadata.block_table = metadata.block_table[:, :2]
    with pytest.raises(ValueError, match="block_table has 2 columns"):
        TRITON.plan(metadata, positions, 4)


def test_backend_selection_and_its_errors(monkeypatch):
    assert select_attention_backend(None, "cpu").name == "torch"
    with pytest.raises(ConfigError, match="unknown attention backend 'flash'"):
        select_attention_backend("flash", "cpu")
    with pytest.raises(ConfigError, match="attention_backend must be one of torch, triton"):
        EngineConfig(attention_backend="flash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        select_attention_backend("triton", "cpu")


def test_kernels_compile_for_hopper(tmp_path):
    """The compiled path, down to an sm_90 cubin, without a GPU (and without the
    interpreter, which does not check what only the compiler does)."""
    env = {key: value for key, value in mpi_env().items() if key != "TRITON_INTERPRET"}
    script = REPO_ROOT / "tests" / "kernel_scripts" / "compile_attention_kernels.py"
    parts = 2  # two processes at once, each compiling every other kernel on one core
    procs = [
        start_process(
            [sys.executable, str(script), str(part), str(parts)],
            # compile for real, not from a cache
            {**env, "TRITON_CACHE_DIR": str(tmp_path / f"part{part}")},
        )
        for part in range(parts)
    ]
    results = wait_all(procs, 240)
    compiled = []
    for result in results:
        assert result.returncode == 0, describe(result)
        compiled += [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    # every kernel once: the parts split the list
    assert len(set(compiled)) == len(compiled) == 12, "\n".join(map(describe, results))


# ---------------------------------------------------------------------------------------
# A whole checkpoint through the CLI with the triton backend, against transformers
# ---------------------------------------------------------------------------------------
PROMPTS = [[5, 17, 42, 7, 99, 3, 250, 11, 60], [8], [200, 201, 202, 9, 14, 77, 31]]
MAX_NEW_TOKENS = 6
# llama: llama3 rope; mistral: a sliding window of 6; qwen2: biases, tied embeddings;
# qwen3: head_dim 24, q/k norms
CLI_ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]
# runs whose decode steps store k / v inside the attention launch (off by default)
FUSED_KV_STORE_ARCHITECTURES = {"qwen3"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """arch -> (CompletedProcess of `ppruntime generate`, GreedyReference); run at once,
    those of FUSED_KV_STORE_ARCHITECTURES with PPRUNTIME_FUSED_KV_STORE=1."""
    jobs = {}
    for arch in CLI_ARCHITECTURES:
        directory = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, num_hidden_layers=2)
        reference = hf_greedy_reference(load_reference_model(directory), PROMPTS, MAX_NEW_TOKENS)
        prompts_file = directory / "prompts.jsonl"
        lines = [json.dumps({"prompt_token_ids": prompt}) + "\n" for prompt in PROMPTS]
        prompts_file.write_text("".join(lines))
        # max_num_tokens=8 chunks the 9-token prompt: a prefill chunk over a cached prefix
        args = [
            *(sys.executable, "-m", "ppruntime", "generate", "--model", str(directory)),
            *("--prompts-file", str(prompts_file), "--max-tokens", str(MAX_NEW_TOKENS)),
            *("--ignore-eos", "--json", "--quiet", "--device", DEVICE, "--block-size", "4"),
            *("--max-num-tokens", "8", "--max-batch-size", "4"),
            *("--attention-backend", "triton", "--log-level", "INFO"),
        ]
        env = mpi_env({} if HAS_CUDA else {"TRITON_INTERPRET": "1"})
        if arch in FUSED_KV_STORE_ARCHITECTURES:
            env["PPRUNTIME_FUSED_KV_STORE"] = "1"
        process = subprocess.Popen(
            args,
            cwd=str(REPO_ROOT),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        jobs[arch] = (args, process, reference)
    results = {}
    for arch, (args, process, reference) in jobs.items():
        try:
            stdout, stderr = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[arch] = (
            subprocess.CompletedProcess(args, process.returncode, stdout, stderr),
            reference,
        )
    return results


@pytest.mark.parametrize("arch", CLI_ARCHITECTURES)
def test_generate_with_triton_backend_matches_transformers(generated, arch):
    result, reference = generated[arch]
    assert result.returncode == 0, describe(result)
    assert "attention backend: triton" in result.stderr, describe(result)
    ours = [json.loads(line)["token_ids"] for line in result.stdout.splitlines() if line.strip()]
    assert len(ours) == len(PROMPTS), describe(result)
    mismatches = compare_greedy(
        reference.tokens, reference.top2_logprobs, ours, reference_top2_ids=reference.top2_ids
    )
    assert not mismatches, "\n".join(mismatches)
