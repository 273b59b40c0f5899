"""Built-in model presets: no checkpoint to download, byte-level tokenizers.

Two kinds:
- random presets (`PRESETS`: tiny, bench-small, null): a config plus seeded random
  weights, no files. Weights are generated per tensor from a seed derived from
  (preset seed, tensor name), so a stage generates only the tensors it holds and any
  partition gives the same weights. Scales keep activations O(1) through the layers
  and make the LM head peaky (top-1 minus top-2 logit typically > 1), so greedy
  decoding is stable: what the tests use.
- trained presets (`TRAINED_PRESETS`: tiny-trained, the default model): a small
  checkpoint shipped in the package (ppruntime/model/data/NAME: config.json and
  bfloat16 model.safetensors, written by scripts/train_tiny.py), computed in float32
  unless a dtype is given. Its text reads as words: what a first run shows.
Preset tokenizers are byte-level: ids 0..255 are bytes, then BOS, then EOS. The random
presets' weights are made by `preset_weights.py`; this module imports without torch.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from ppruntime.model.config import ModelConfig, load_model_config

BYTE_BOS_ID = 256
BYTE_EOS_ID = 257


def _llama_preset(**sizes: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        bos_token_id=BYTE_BOS_ID,
        eos_token_ids=(BYTE_EOS_ID,),
        torch_dtype="float32",
        **sizes,
    )


PRESETS: dict[str, ModelConfig] = {
    # Default demo model: fast enough for every test.
    "tiny": _llama_preset(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    # Compute-dominated decode on one CPU thread (tens of ms per step at batch 16-32).
    "bench-small": _llama_preset(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
    ),
    # For null-compute overhead benchmarks (the engine skips the math).
    "null": _llama_preset(
        vocab_size=512,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    ),
}


PRESET_DATA_DIR = Path(__file__).resolve().parent / "data"
TRAINED_PRESETS: dict[str, Path] = {
    # 4 layers, hidden 192, byte vocabulary (the id space of `tiny`), trained on the
    # King James Bible (data/kjv/) by scripts/train_tiny.py.
    "tiny-trained": PRESET_DATA_DIR / "tiny-trained",
}
# What runs when neither a checkpoint nor a preset is named (CLI and LLM()).
DEFAULT_PRESET = "tiny-trained"


def preset_names() -> tuple[str, ...]:
    return (*TRAINED_PRESETS, *PRESETS)


def is_preset(name: object) -> bool:
    return isinstance(name, str) and (name in PRESETS or name in TRAINED_PRESETS)


def preset_config(name: str) -> ModelConfig:
    if name in TRAINED_PRESETS:
        return _trained_preset_config(name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return PRESETS[name]


def trained_preset_dir(name: str) -> Path | None:
    """The shipped checkpoint directory of a trained preset; None for the others."""
    return TRAINED_PRESETS.get(name)


@functools.cache
def _trained_preset_config(name: str) -> ModelConfig:
    # stored in bfloat16 to stay small; computed in float32 like the random presets
    return dataclasses.replace(load_model_config(TRAINED_PRESETS[name]), torch_dtype="float32")
