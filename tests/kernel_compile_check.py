"""Compile every layer kernel for a Hopper GPU (sm_90) down to a cubin, without a GPU.

Run as a script (not under TRITON_INTERPRET): the interpreter runs the kernels' Python and
would not catch what only the compiler rejects. Prints one line per variant compiled.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ppruntime.kernels import activation, rms_norm, rotary, sampling

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, signature: dict[str, str], constexprs: dict[str, object]) -> None:
    for name in constexprs:
        signature[name] = "constexpr"
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET
    )
    assert compiled.asm["cubin"], kernel.__name__
    print(kernel.__name__, signature.get("x_ptr") or signature.get("qkv_ptr"), constexprs)


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
    # the greedy step's block reduction into the packed [2, N] result
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


if __name__ == "__main__":
    main()
