"""Attention backends behind one interface (base.AttentionBackend), chosen once per engine.

backend = select_attention_backend("triton", torch.device("cuda"))
plan = backend.plan(attn, positions, block_size)  # once per stage forward
out = backend.forward(q, k, v, layer_cache, plan, scale, sliding_window)  # per layer
"""

from __future__ import annotations

import os

import torch

from ppruntime.config import ATTENTION_BACKENDS, ConfigError, env_flag
from ppruntime.model.backends.base import AttentionBackend, LayerAttention
from ppruntime.model.backends.torch_backend import TorchAttentionBackend

# the triton backend's decode step stores k / v inside its attention launch (off until timed)
FUSED_KV_STORE_ENV = "PPRUNTIME_FUSED_KV_STORE"


def default_attention_backend(device: torch.device) -> str:
    """`triton` on CUDA, `torch` elsewhere."""
    return "triton" if torch.device(device).type == "cuda" else "torch"


def select_attention_backend(name: str | None, device: torch.device | str) -> AttentionBackend:
    """The backend called `name` (None = the default for `device`) for tensors on `device`."""
    device = torch.device(device)
    if name is None:
        name = default_attention_backend(device)
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    fused_store = env_flag(FUSED_KV_STORE_ENV)  # checked whichever backend: a bad value is named
    if name == "torch":
        return TorchAttentionBackend()
    interpreted = os.environ.get("TRITON_INTERPRET", "") == "1"
    if device.type != "cuda" and not interpreted:
        raise ConfigError(
            f"attention backend 'triton' needs a CUDA device (this rank runs on {device}); "
            "choose --attention-backend torch, or set TRITON_INTERPRET=1 to run the kernels "
            "interpreted on the CPU (slow: for tests)"
        )
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "attention backend 'triton' needs the triton package (pip install triton), "
            f"which failed to import ({exc}); or choose --attention-backend torch"
        ) from exc
    from ppruntime.kernels.paged_attention import prefill_kernel_from_env
    from ppruntime.model.backends.triton_backend import TritonAttentionBackend

    try:
        prefill_kernel_from_env()  # refused at start-up, not at the first prefill
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return TritonAttentionBackend(fused_decode_store=bool(fused_store))


__all__ = [
    "AttentionBackend",
    "LayerAttention",
    "TorchAttentionBackend",
    "default_attention_backend",
    "select_attention_backend",
]
