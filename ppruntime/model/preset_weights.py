"""The built-in presets' weights: each tensor drawn from a seed of its own name, so a
stage holds the same values whatever the partition. Apart from `presets.py` (their
configurations), which imports without torch."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch

from ppruntime.model.config import ModelConfig
from ppruntime.model.presets import preset_config

if TYPE_CHECKING:
    from ppruntime.model.stage_model import StageModel

PRESET_SEED = 1234
LOGIT_SCALE = 12.0  # std of the logits for a unit-RMS final hidden state


def tensor_seed(preset_seed: int, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{preset_seed}/{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def preset_tensor(
    config: ModelConfig, name: str, shape: tuple[int, ...], seed: int = PRESET_SEED
) -> torch.Tensor:
    """The float32 value of preset tensor `name` (independent of any partition)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    values = torch.randn(shape, generator=generator)
    return values * _std(config, name, shape)


def _std(config: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    if name == "model.embed_tokens.weight":
        return 1.0
    if name == "lm_head.weight":
        return LOGIT_SCALE / math.sqrt(config.hidden_size)
    fan_in = shape[-1] if len(shape) > 1 else config.hidden_size
    std = 1.0 / math.sqrt(fan_in)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * config.num_hidden_layers)  # residual branches stay small
    return std


def fill_preset_weights(model: StageModel, name: str) -> tuple[str, ...]:
    """Fill `model`'s parameters with preset `name`'s weights; returns the tensor names."""
    config = preset_config(name)
    params = model.checkpoint_parameters()
    with torch.no_grad():
        for tensor_name, param in params.items():
            param.copy_(preset_tensor(config, tensor_name, tuple(param.shape)))
    return tuple(params)
