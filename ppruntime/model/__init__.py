"""Model layer of ppruntime: configs, partitioning, stage models, weights, tokenizers.

Knows nothing about MPI: a stage model is an ordinary torch module for a slice of layers.
"""

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends import select_attention_backend
from ppruntime.model.backends.torch_backend import paged_attention
from ppruntime.model.config import ModelConfig, config_from_dict, load_model_config
from ppruntime.model.errors import ModelLoadError
from ppruntime.model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from ppruntime.model.layer_ops import LayerOps, select_layer_ops
from ppruntime.model.loader import SUPPORTED_DTYPES, load_config, load_stage_model, resolve_dtype
from ppruntime.model.partition import (
    PartitionError,
    StageSpec,
    parse_layer_partition,
    partition_layers,
    stage_extra_costs,
)
from ppruntime.model.presets import (
    DEFAULT_PRESET,
    PRESETS,
    TRAINED_PRESETS,
    is_preset,
    preset_config,
    preset_names,
)
from ppruntime.model.stage_model import StageModel
from ppruntime.model.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    TokenizerUnavailableError,
    load_tokenizer,
    require_tokenizer,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "SUPPORTED_DTYPES",
    "TRAINED_PRESETS",
    "AttentionMetadata",
    "ByteTokenizer",
    "LayerOps",
    "ModelConfig",
    "ModelLoadError",
    "PartitionError",
    "StageModel",
    "StageSpec",
    "Tokenizer",
    "TokenizerUnavailableError",
    "allocate_kv_cache",
    "config_from_dict",
    "is_preset",
    "kv_cache_bytes_per_block",
    "load_config",
    "load_model_config",
    "load_stage_model",
    "load_tokenizer",
    "paged_attention",
    "parse_layer_partition",
    "partition_layers",
    "preset_config",
    "preset_names",
    "require_tokenizer",
    "resolve_dtype",
    "select_attention_backend",
    "select_layer_ops",
    "stage_extra_costs",
]
