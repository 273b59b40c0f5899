"""LayerOps: the per-layer math around attention, behind one interface.

The projections and the LM head (`linear`), RMSNorm (plain and fused with the residual
add), rotary embedding on the merged qkv projection (with Qwen3's per-head q/k RMSNorm
before it) and SiLU-and-multiply on the merged gate_up projection. `TorchLayerOps` is the
reference: plain torch with Hugging Face numerics, the oracle the others are tested
against. `TritonLayerOps` runs the kernels of ppruntime.kernels (fp32 math, one kernel per
op, q and k rotated in place); its `linear` is F.linear (cuBLAS) unless built with
`skinny_gemm=True` (PPRUNTIME_SKINNY_GEMM=1), which sends decode-sized matmuls to the
skinny GEMM kernel where `skinny_config` has a launch for the shape. `silu_mul_linear` (the
MLP's activation and down projection) is the two calls, except in the triton ops with the
skinny GEMM on where the table has a fused launch for the shape (`silu_mul_config`): one
kernel then computes silu(gate) * up as it loads the GEMM's A operand.

Names match the attention backends: "torch" and "triton"; `select_layer_ops(None, device)`
picks triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ppruntime.config import ATTENTION_BACKENDS, DEPENDENT_LAUNCH_ENV, ConfigError, env_flag
from ppruntime.model.rope import apply_rope, rope_angles, rope_cos_sin


class RopeTables(NamedTuple):
    """cos and sin of each token's rotary angles; the layout belongs to the LayerOps that
    made them (built once per forward by `rope_tables`, shared by every layer)."""

    cos: torch.Tensor
    sin: torch.Tensor


class QKV(NamedTuple):
    q: torch.Tensor  # [T, Hq, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor  # [T, Hkv, D]


SKINNY_GEMM_ENV = "PPRUNTIME_SKINNY_GEMM"


class LayerOps(ABC):
    name: ClassVar[str]

    @abstractmethod
    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [T, K] @ weight [N, K]^T (+ bias [N]) -> [T, N], as F.linear."""

    @abstractmethod
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of x [..., H], weight [H]."""

    @abstractmethod
    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x); the inputs are not modified."""

    @abstractmethod
    def rope_tables(
        self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> RopeTables:
        """The rotary tables for absolute `positions` [T] (once per forward)."""

    @abstractmethod
    def qkv_rope(
        self,
        qkv: torch.Tensor,  # [T, (Hq + 2 Hkv) * D], the merged projection's output
        rope: RopeTables,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> QKV:
        """q, k (per-head RMSNorm first when the weights are given, then rotated) and v.

        May write into `qkv`; the results may be views of it (not contiguous).
        """

    @abstractmethod
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2 * I] (gate columns first) -> silu(gate) * up [T, I]."""

    def silu_mul_linear(
        self, gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MLP's activation and down projection: gate_up [T, 2 * I], weight [N, I]
        -> linear(silu_and_mul(gate_up), weight, bias) [T, N]. This composition of the two
        calls is the reference; a LayerOps may fuse them."""
        return self.linear(self.silu_and_mul(gate_up), weight, bias)

    def describe(self) -> str:
        """The name and any switch that changes what runs, for the start-up log."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> QKV:
    """Views of the q, k, v heads of qkv [T, (Hq + 2 Hkv) * D]."""
    num_tokens = qkv.shape[0]
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    return QKV(
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


class TorchLayerOps(LayerOps):
    """The reference: Hugging Face Llama/Qwen3 math in plain torch, on any device."""

    name = "torch"

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # (the casts only where they convert: a no-op cast is still a torch call)
        input_dtype = x.dtype
        x32 = x if input_dtype == torch.float32 else x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + eps)
        return weight * (x32 if input_dtype == torch.float32 else x32.to(input_dtype))

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def rope_tables(
        self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> RopeTables:
        return RopeTables(*rope_cos_sin(inv_freq, positions, dtype))  # [T, 1, D] each, in dtype

    def qkv_rope(
        self,
        qkv: torch.Tensor,
        rope: RopeTables,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> QKV:
        q, k, v = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
        if q_norm_weight is not None and k_norm_weight is not None:
            q, k = self.rms_norm(q, q_norm_weight, eps), self.rms_norm(k, k_norm_weight, eps)
            return QKV(apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin), v)
        # q and k heads are adjacent in qkv: rotate them as one [T, Hq + Hkv, D] tensor
        # (the same elementwise math, half the torch calls)
        num_tokens = qkv.shape[0]
        qk = qkv[:, : (num_heads + num_kv_heads) * head_dim]
        rotated = apply_rope(qk.view(num_tokens, num_heads + num_kv_heads, head_dim), *rope)
        q, k = rotated.split([num_heads, num_kv_heads], dim=1)
        return QKV(q, k, v)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class TritonLayerOps(LayerOps):
    """The Triton kernels: one launch per op, fp32 math, q and k rotated inside qkv.

    `skinny_gemm`: decode-sized matmuls (the rows of x at most the kernel's limit) run the
    skinny GEMM kernel where `skinny_config` returns a launch for the shape; every other
    matmul (and all of them when off, the default) is F.linear."""

    name = "triton"

    def __init__(self, skinny_gemm: bool = False, measured_only: bool = False) -> None:
        from ppruntime.kernels import activation, rms_norm, rotary

        self._norm, self._rotary, self._activation = rms_norm, rotary, activation
        self._skinny = None
        self._measured_only = measured_only  # shapes the table lacks stay cuBLAS
        if skinny_gemm:
            from ppruntime.kernels import skinny_gemm as skinny

            self._skinny = skinny

    def describe(self) -> str:
        if self._skinny is None:
            return self.name
        shapes = "the launch table's shapes" if self._measured_only else "every decode shape"
        fused = (
            ", SiLU-and-mul fused into the down projection where the table says"
            if self._skinny.has_silu_mul_launches()
            else ""
        )
        return f"{self.name} (skinny GEMM on for {shapes}{fused})"

    def __repr__(self) -> str:
        measured = ", measured_only=True" if self._measured_only else ""
        return f"{type(self).__name__}(skinny_gemm={self._skinny is not None}{measured})"

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        skinny = self._skinny
        if skinny is not None and x.dim() == 2 and x.shape[0] <= skinny.MAX_M:
            config = skinny.skinny_config(
                x.shape[0], weight.shape[0], weight.shape[1], x.dtype, self._measured_only
            )
            if config is not None and x.stride(1) == 1 and weight.stride(1) == 1:
                return skinny.skinny_gemm(x, weight, bias, config)
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self._norm.rms_norm(x, weight, eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm.fused_add_rms_norm(x, residual, weight, eps)

    def rope_tables(
        self, inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> RopeTables:
        angles = rope_angles(inv_freq, positions)  # [T, D/2] float32, whatever the dtype
        return RopeTables(angles.cos(), angles.sin())

    def qkv_rope(
        self,
        qkv: torch.Tensor,
        rope: RopeTables,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_norm_weight: torch.Tensor | None = None,
        k_norm_weight: torch.Tensor | None = None,
        eps: float = 1e-6,
    ) -> QKV:
        self._rotary.qk_norm_rope_(
            qkv,
            rope.cos,
            rope.sin,
            num_heads,
            num_kv_heads,
            head_dim,
            q_norm_weight,
            k_norm_weight,
            eps,
        )
        return split_qkv(qkv, num_heads, num_kv_heads, head_dim)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._activation.silu_and_mul(gate_up)

    def silu_mul_linear(
        self, gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        skinny = self._skinny
        if (
            skinny is not None
            and gate_up.dim() == 2
            and gate_up.shape[0] <= skinny.MAX_M
            and gate_up.stride(1) == 1
            and weight.stride(1) == 1
        ):
            config = skinny.silu_mul_config(
                gate_up.shape[0], weight.shape[0], weight.shape[1], gate_up.dtype
            )
            if config is not None:
                return skinny.skinny_gemm_silu_mul(gate_up, weight, bias, config)
        return super().silu_mul_linear(gate_up, weight, bias)


def select_layer_ops(name: str | None, device: torch.device | str) -> LayerOps:
    """The LayerOps called `name` ("torch", "triton"); None = triton on CUDA, else torch.
    The triton ops run the skinny decode GEMM when $PPRUNTIME_SKINNY_GEMM is true (every
    decode-sized shape, the heuristic launch where the table has none); when it is unset,
    on a CUDA device of the name the launch table was measured on, for the table's shapes
    only (the others stay cuBLAS); false: never.

    Raises ConfigError for an unknown name, or triton where it cannot run.
    """
    device = torch.device(device)
    skinny_gemm = env_flag(SKINNY_GEMM_ENV)  # checked whichever ops: a bad value is named
    env_flag(DEPENDENT_LAUNCH_ENV)  # read at each kernel launch: refused here, at start-up
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchLayerOps()
    if name == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                f"the triton layer ops run on CUDA devices (or on CPU under TRITON_INTERPRET=1),"
                f" not on {device}; use 'torch' there"
            )
        try:
            if skinny_gemm is None:  # unset: the measured launches, on the device measured
                measured = _skinny_table_fits(device)
                return TritonLayerOps(skinny_gemm=measured, measured_only=measured)
            return TritonLayerOps(skinny_gemm=skinny_gemm)
        except ImportError as exc:
            raise ConfigError(
                f"the triton layer ops need the triton package ({exc}); "
                "install triton or use 'torch'"
            ) from None
    raise ConfigError(f"unknown layer ops {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")


def _skinny_table_fits(device: torch.device) -> bool:
    """Whether the skinny GEMM's launch table was measured on a device of this name."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    from ppruntime.kernels import skinny_gemm

    measured_on = skinny_gemm.table_device()
    return measured_on is not None and measured_on == torch.cuda.get_device_name(device)
