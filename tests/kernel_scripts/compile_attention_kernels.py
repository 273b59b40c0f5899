"""Compile the attention kernels for a Hopper GPU (sm_90) on a machine without one.

The interpreter checks numerics but not what only the compiler checks (loop-carried
types, layouts, shared memory); this runs triton's whole pipeline down to a cubin for
the launches the backend picks for real model shapes. Run without TRITON_INTERPRET.
Prints one line per kernel; exits non-zero on the first failure. `PART COUNT` arguments
compile only that share of the kernels (tests/test_attention_kernels.py runs two at once).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "") != "1", "run without TRITON_INTERPRET"

from ptx_order import assert_waits_before_memory  # noqa: E402

from ppruntime.kernels import kv_store  # noqa: E402
from ppruntime.kernels import paged_attention as pa  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
INT64_ARGS = ("stride_cache_kv", "stride_cache_block")  # large caches pass 64-bit strides
# what the launcher specialises at run time: pointers and strides that are multiples of 16
# (all of them for the shapes below) get tt.divisibility=16, which is what lets the K/V
# loads become 16-byte cp.async copies (without it the cubin is not the one that runs)
ALIGNED = ("_ptr", "stride_")


def compile_kernel(kernel, pointers: dict[str, str], constants: dict, warps: int, stages: int):
    # compiled as the GPU launches them: with programmatic dependent launch's instructions
    constants = {**constants, "PDL": True}
    signature = {}
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(kernel.arg_names)
        if name not in constants and (name.endswith(ALIGNED[0]) or name.startswith(ALIGNED[1]))
    }
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in INT64_ARGS:
            signature[name] = "i64"
        elif name == "scale_log2":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(
        source, target=TARGET, options={"num_warps": warps, "num_stages": stages}
    )
    assert_waits_before_memory(compiled.asm["ptx"], kernel.__name__)
    return compiled


def attention(name, dtype, hq, hkv, head_dim, launch, window, block_size=16):
    element = TRITON_TYPES[dtype]
    pointers = {
        "out_ptr": f"*{element}",
        "partial_out_ptr": "*fp32",
        "partial_stats_ptr": "*fp32",
        "q_ptr": f"*{element}",
        "cache_ptr": f"*{element}",
        "query_start_loc_ptr": "*i64",
        "seq_lens_ptr": "*i64",
        "block_table_ptr": "*i32",
        "block_table_rows_ptr": "*i64",
        "slot_mapping_ptr": "*i64",
        "k_new": f"*{element}",
        "v_new": f"*{element}",
    }
    if launch.new_kv == "descriptor":  # TMA descriptors of [T, Hkv * D] k / v
        box = f"[{launch.block_n},{max(triton.next_power_of_2(head_dim), 16)}]"
        pointers["k_new"] = pointers["v_new"] = f"tensordesc<{element}{box}>"
    group = hq // hkv
    constants = pa.attention_constants(
        launch,
        group,
        head_dim,
        block_size,
        dtype,
        has_rows=True,
        has_window=window,
    )
    compiled = compile_kernel(
        pa._paged_attention_kernel, pointers, constants, launch.num_warps, launch.num_stages
    )
    print(f"ok {name}: {launch} shared={compiled.metadata.shared}", flush=True)
    if launch.num_splits > 1:
        pointers = {
            "out_ptr": f"*{element}",
            "partial_out_ptr": "*fp32",
            "partial_stats_ptr": "*fp32",
            "seq_lens_ptr": "*i64",
        }
        compile_kernel(
            pa._merge_splits_kernel, pointers, pa.merge_constants(launch, head_dim, window), 4, 2
        )
        print(f"ok {name}: merge of {launch.num_splits} splits", flush=True)


def kv_store_bf16_d80() -> None:
    pointers = {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*bf16", "slot_ptr": "*i64"}
    constants = {"BLOCK_SIZE": 16, "HEAD_DIM": 80, "HEADS_PAD": 8, "DIM_PAD": 128}
    compile_kernel(kv_store._kv_store_kernel, pointers, constants, 4, 2)
    print("ok kv store bf16 d80", flush=True)


def steps() -> list:
    """Every compilation of the check, each a call (in this order)."""
    decode = pa.decode_launch(
        num_seqs=1, num_kv_heads=8, max_context_len=32768, target_programs=528
    )
    assert decode.num_splits > 1
    # batch 64 on the H200 (2 programs an SM): one split, no merge
    decode_64 = pa.decode_launch(
        num_seqs=64, num_kv_heads=8, max_context_len=32768, target_programs=264
    )
    assert decode_64.num_splits == 1
    # the default prefill kernel reads the chunk's keys through TMA descriptors; the
    # candidate with plain new-key loads is compiled with a window
    tiled = pa.prefill_launch(torch.bfloat16, 512, 4)
    fp32_prefill = pa.prefill_launch(torch.float32, 512, 2)
    return [
        # decode launches storing this step's k / v (fused_store, as decode_launch picks and
        # the backend runs with PPRUNTIME_FUSED_KV_STORE=1), and the backend's default: the
        # batch-64 launch after store_kv, reading the new key from the cache
        lambda: attention("8B decode bf16", torch.bfloat16, 32, 8, 128, decode, window=False),
        lambda: attention("8B decode bf16 batch 64", torch.bfloat16, 32, 8, 128, decode_64, False),
        lambda: attention(
            "8B decode bf16 batch 64 store_kv first",
            torch.bfloat16,
            32,
            8,
            128,
            replace(decode_64, fused_store=False),
            False,
        ),
        lambda: attention(
            "8B prefill bf16",
            torch.bfloat16,
            32,
            8,
            128,
            pa.prefill_launch(torch.bfloat16, 512, 4),
            False,
        ),
        lambda: attention(
            "8B prefill bf16 legacy",
            torch.bfloat16,
            32,
            8,
            128,
            pa.prefill_launch(torch.bfloat16, 512, 4, kernel="legacy"),
            False,
        ),
        lambda: attention(
            "8B prefill bf16 new-kv window",
            torch.bfloat16,
            32,
            8,
            128,
            replace(tiled, **pa.PREFILL_VARIANTS["new-kv"]),
            True,
        ),
        lambda: attention(
            "mixed fp16 d80 window",
            torch.float16,
            16,
            8,
            80,
            pa.prefill_launch(torch.float16, 8, 2),
            True,
        ),
        lambda: attention("fp32 decode d96 window", torch.float32, 8, 4, 96, decode, window=True),
        lambda: attention(
            "fp32 prefill d96 window", torch.float32, 8, 4, 96, fp32_prefill, window=True
        ),
        kv_store_bf16_d80,
    ]


def main(argv: list[str]) -> int:
    """No argument: every step. `PART COUNT`: the steps i with i % COUNT == PART (the
    test runs the parts in parallel processes, one per core)."""
    part, count = (int(argv[0]), int(argv[1])) if argv else (0, 1)
    for index, step in enumerate(steps()):
        if index % count == part:
            step()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
