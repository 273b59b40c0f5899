"""Model layer of ppruntime: configs, partitioning, stage models, weights, tokenizers.

Knows nothing about MPI: a stage model is an ordinary torch module for a slice of layers.
The names below are imported on first use: a light submodule (`ppruntime.model.tokenizer`,
`ppruntime.model.presets`) imports without torch, as `ppruntime serve`'s HTTP process does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppruntime.lazy_names import lazy_getattr

if TYPE_CHECKING:
    from ppruntime.model.attention import AttentionMetadata
    from ppruntime.model.backends import select_attention_backend
    from ppruntime.model.backends.torch_backend import paged_attention
    from ppruntime.model.config import ModelConfig, config_from_dict, load_model_config
    from ppruntime.model.errors import ModelLoadError
    from ppruntime.model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
    from ppruntime.model.layer_ops import LayerOps, select_layer_ops
    from ppruntime.model.loader import (
        SUPPORTED_DTYPES,
        load_config,
        load_stage_model,
        resolve_dtype,
    )
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

_LAZY = {
    "AttentionMetadata": "ppruntime.model.attention",
    "ByteTokenizer": "ppruntime.model.tokenizer",
    "DEFAULT_PRESET": "ppruntime.model.presets",
    "LayerOps": "ppruntime.model.layer_ops",
    "ModelConfig": "ppruntime.model.config",
    "ModelLoadError": "ppruntime.model.errors",
    "PRESETS": "ppruntime.model.presets",
    "PartitionError": "ppruntime.model.partition",
    "SUPPORTED_DTYPES": "ppruntime.model.loader",
    "StageModel": "ppruntime.model.stage_model",
    "StageSpec": "ppruntime.model.partition",
    "TRAINED_PRESETS": "ppruntime.model.presets",
    "Tokenizer": "ppruntime.model.tokenizer",
    "TokenizerUnavailableError": "ppruntime.model.tokenizer",
    "allocate_kv_cache": "ppruntime.model.kv_cache",
    "config_from_dict": "ppruntime.model.config",
    "is_preset": "ppruntime.model.presets",
    "kv_cache_bytes_per_block": "ppruntime.model.kv_cache",
    "load_config": "ppruntime.model.loader",
    "load_model_config": "ppruntime.model.config",
    "load_stage_model": "ppruntime.model.loader",
    "load_tokenizer": "ppruntime.model.tokenizer",
    "paged_attention": "ppruntime.model.backends.torch_backend",
    "parse_layer_partition": "ppruntime.model.partition",
    "partition_layers": "ppruntime.model.partition",
    "preset_config": "ppruntime.model.presets",
    "preset_names": "ppruntime.model.presets",
    "require_tokenizer": "ppruntime.model.tokenizer",
    "resolve_dtype": "ppruntime.model.loader",
    "select_attention_backend": "ppruntime.model.backends",
    "select_layer_ops": "ppruntime.model.layer_ops",
    "stage_extra_costs": "ppruntime.model.partition",
}

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


__getattr__ = lazy_getattr(__name__, _LAZY)
