"""Compile every layer kernel for a Hopper GPU (sm_90) down to a cubin, without a GPU.

Run as a script (not under TRITON_INTERPRET): the interpreter runs the kernels' Python and
would not catch what only the compiler rejects. Prints one line per variant compiled.
`PART COUNT` arguments compile only every COUNT-th variant from the PART-th (the test runs
two parts at once, one a core).
"""

from __future__ import annotations

import itertools
import sys

import triton
from kernel_scripts.ptx_order import assert_waits_before_memory
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ppruntime.kernels import activation, rms_norm, rotary, sampling, skinny_gemm

TARGET = GPUTarget("cuda", 90, 32)
PART, PARTS = (int(arg) for arg in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 1)
_variants = itertools.count()  # the variants in the order main() meets them


def compile_kernel(
    kernel,
    signature: dict[str, str],
    constexprs: dict[str, object],
    options: dict | None = None,
    aligned: tuple[str, ...] = (),
):
    """`aligned`: the arguments the launcher would mark divisible by 16 (pointers, strides).
    Compiled as the GPU launches them: with programmatic dependent launch's instructions."""
    index = next(_variants)
    if index % PARTS != PART:
        return
    constexprs = {**constexprs, "PDL": True}
    for name in constexprs:
        signature[name] = "constexpr"
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(kernel.arg_names)
        if name in aligned
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=TARGET,
        options=options or {},
    )
    assert compiled.asm["cubin"], kernel.__name__
    assert_waits_before_memory(compiled.asm["ptx"], kernel.__name__)
    print(index, kernel.__name__, signature.get("x_ptr") or signature.get("qkv_ptr"), constexprs)
    return compiled


def main() -> None:
    for dtype in ("fp32", "bf16", "fp16"):
        pointer = f"*{dtype}"
        for has_residual in (False, True):
            compile_kernel(
                rms_norm._rms_norm_kernel,
                {
                    **dict.fromkeys(
                        ["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"],
                        pointer,
                    ),
                    **dict.fromkeys(
                        [
                            "x_row_stride",
                            "residual_row_stride",
                            "out_row_stride",
                            "residual_out_row_stride",
                            "hidden",
                        ],
                        "i32",
                    ),
                    "eps": "fp32",
                },
                {"HAS_RESIDUAL": has_residual, "BLOCK": 4096},
            )
        compile_kernel(
            activation._silu_and_mul_kernel,
            {
                "gate_up_ptr": pointer,
                "out_ptr": pointer,
                **dict.fromkeys(["in_row_stride", "out_row_stride", "inner"], "i32"),
            },
            {"BLOCK": 1024},
        )
        for qk_norm in (False, True):
            compile_kernel(
                rotary._qk_norm_rope_kernel,
                {
                    "qkv_ptr": pointer,
                    "cos_ptr": "*fp32",
                    "sin_ptr": "*fp32",
                    "q_norm_ptr": pointer,
                    "k_norm_ptr": pointer,
                    **dict.fromkeys(
                        [
                            "qkv_row_stride",
                            "cos_row_stride",
                            "sin_row_stride",
                            "num_q_heads",
                            "num_kv_heads",
                        ],
                        "i32",
                    ),
                    "eps": "fp32",
                },
                {
                    "QK_NORM": qk_norm,
                    "HEAD_DIM": 80,
                    "BLOCK_HQ": 32,
                    "BLOCK_HKV": 2,
                    "BLOCK_HALF": 64,
                },
            )
    # the sampling kernels: per-block maxima (greedy, and with Gumbel noise), then the
    # greedy step's block reduction into the packed [2, N] result
    compile_kernel(
        sampling._block_argmax_kernel,
        {
            "logits_ptr": "*bf16",
            "row_stride": "i32",
            "block_max_ptr": "*fp32",
            "block_arg_ptr": "*i64",
            "block_bad_ptr": "*i32",
            "vocab": "i32",
            "num_blocks": "i32",
        },
        {"BLOCK": sampling.VOCAB_BLOCK},
    )
    compile_kernel(
        sampling._gumbel_block_argmax_kernel,
        {
            "scores_ptr": "*fp32",
            "score_row_stride": "i32",
            "key_a_ptr": "*i64",
            "key_b_ptr": "*i64",
            "noisy_ptr": "*i32",
            "block_max_ptr": "*fp32",
            "block_arg_ptr": "*i64",
            "vocab": "i32",
            "num_blocks": "i32",
        },
        {"BLOCK": sampling.VOCAB_BLOCK},
    )
    compile_kernel(
        sampling._pick_block_kernel,
        {
            "block_max_ptr": "*fp32",
            "block_arg_ptr": "*i64",
            "block_bad_ptr": "*i32",
            "out_ptr": "*i32",
            "num_rows": "i32",
            "num_blocks": "i32",
        },
        {"BLOCKS": 128},
    )

    compile_skinny_gemm()
    compile_stream_k()


def compile_skinny_gemm() -> None:
    """The decode GEMM: bf16 with the weights through plain loads (with a bias) and through
    a TMA descriptor (split-K partials), fp32 IEEE dots with atomic split-K (unswapped), the
    same three with SiLU-and-multiply fused into the x operand's load, and the reduce."""
    plain = [  # (dtype, config, K % BLOCK_K == 0, bias)
        ("bf16", skinny_gemm.SkinnyConfig(block_n=64, block_k=128), True, True),
        (
            "bf16",
            skinny_gemm.SkinnyConfig(block_n=128, block_k=128, split_k=4, weights="descriptor"),
            True,
            False,
        ),
        (
            "fp32",
            skinny_gemm.SkinnyConfig(
                block_m=16, block_n=32, block_k=64, split_k=2, reduction="atomic", swap_ab=False
            ),
            False,
            False,
        ),
    ]
    variants = [(*variant, False) for variant in plain] + [(*variant, True) for variant in plain]
    aligned = ("x_ptr", "w_ptr", "out_ptr", "partial_ptr", "stride_xm", "stride_wn", "stride_om")
    for dtype, config, even_k, bias, silu_mul in variants:
        split = config.split_k > 1
        weight = (
            f"tensordesc<{dtype}[{config.block_n},{config.block_k}]>"
            if config.weights == "descriptor"
            else f"*{dtype}"
        )
        compile_kernel(
            skinny_gemm._skinny_gemm_kernel,
            {
                "x_ptr": f"*{dtype}",
                "w_ptr": weight,
                "bias_ptr": f"*{dtype}",
                "out_ptr": "*fp32" if split else f"*{dtype}",
                **dict.fromkeys(
                    ["M", "N", "K", "stride_xm", "stride_wn", "stride_om", "stride_split"], "i32"
                ),
                "k_per_split": "i32",
                "up_offset": "i32",
            },
            {
                "BLOCK_M": config.block_m,
                "BLOCK_N": config.block_n,
                "BLOCK_K": config.block_k,
                "SPLIT": split,
                "ATOMIC": split and config.reduction == "atomic",
                "HAS_BIAS": bias and not split,
                "SWAP_AB": config.swap_ab,
                "W_DESCRIPTOR": config.weights == "descriptor",
                "EVEN_N": True,
                "EVEN_K": even_k,
                "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                "UPCAST": False,
                "SILU_MUL": silu_mul,
            },
            {"num_warps": config.num_warps, "num_stages": config.num_stages},
            aligned,
        )
    compile_kernel(
        skinny_gemm._reduce_splits_kernel,
        {
            "partial_ptr": "*fp32",
            "bias_ptr": "*bf16",
            "out_ptr": "*bf16",
            **dict.fromkeys(["N", "num_splits", "stride_split", "stride_pm", "stride_om"], "i32"),
        },
        {"HAS_BIAS": True, "BLOCK": skinny_gemm.REDUCE_BLOCK},
        aligned=("partial_ptr", "out_ptr", "stride_pm", "stride_om"),
    )


# stream-K (SkinnyConfig.programs > 0): (dtype, config, K % BLOCK_K == 0, N % BLOCK_N == 0,
# bias); the first is the 8B qkv launch's tiles (M 64, N 6144, K 4096 on 132 SMs)
STREAM_K_VARIANTS = [
    ("bf16", skinny_gemm.SkinnyConfig(block_n=64, block_k=128, programs=132), True, True, True),
    (
        "bf16",
        skinny_gemm.SkinnyConfig(block_n=128, block_k=128, programs=264, weights="descriptor"),
        True,
        True,
        False,
    ),
    (
        "fp32",
        skinny_gemm.SkinnyConfig(block_m=16, block_n=32, block_k=64, programs=5, swap_ab=False),
        False,
        False,
        True,
    ),
]


def compile_stream_k_variant(dtype, config, even_k, even_n, bias, silu_mul):
    weight = (
        f"tensordesc<{dtype}[{config.block_n},{config.block_k}]>"
        if config.weights == "descriptor"
        else f"*{dtype}"
    )
    return compile_kernel(
        skinny_gemm._stream_k_kernel,
        {
            "x_ptr": f"*{dtype}",
            "w_ptr": weight,
            "bias_ptr": f"*{dtype}",
            "out_ptr": f"*{dtype}",
            "partial_ptr": "*fp32",
            "flag_ptr": "*i32",
            **dict.fromkeys(
                [
                    "M",
                    "N",
                    "K",
                    "stride_xm",
                    "stride_wn",
                    "stride_om",
                    "up_offset",
                    "n_tiles",
                    "k_iters",
                    "total_iters",
                ],
                "i32",
            ),
        },
        {
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "BLOCK_K": config.block_k,
            "HAS_BIAS": bias,
            "SWAP_AB": config.swap_ab,
            "W_DESCRIPTOR": config.weights == "descriptor",
            "EVEN_N": even_n,
            "EVEN_K": even_k,
            "PRECISION": "ieee" if dtype == "fp32" else "tf32",
            "UPCAST": False,
            "SILU_MUL": silu_mul,
        },
        {"num_warps": config.num_warps, "num_stages": config.num_stages},
        ("x_ptr", "w_ptr", "out_ptr", "partial_ptr", "stride_xm", "stride_wn", "stride_om"),
    )


def compile_stream_k() -> None:
    """The stream-K kernel: every STREAM_K_VARIANTS entry, plain and with SiLU-and-mul."""
    for silu_mul in (False, True):
        for variant in STREAM_K_VARIANTS:
            compile_stream_k_variant(*variant, silu_mul)


if __name__ == "__main__":
    main()
