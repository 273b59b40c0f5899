"""Build the StageModel of one pipeline stage from a checkpoint directory or a preset."""

from __future__ import annotations

from pathlib import Path

import torch

from ppruntime.model.backends.base import AttentionBackend
from ppruntime.model.checkpoint import SafetensorsCheckpoint
from ppruntime.model.config import ModelConfig, load_model_config
from ppruntime.model.errors import ModelLoadError
from ppruntime.model.layer_ops import LayerOps
from ppruntime.model.partition import StageSpec
from ppruntime.model.preset_weights import fill_preset_weights
from ppruntime.model.presets import is_preset, preset_config, trained_preset_dir
from ppruntime.model.stage_model import EMBED_NAME, LM_HEAD_NAME, StageModel

SUPPORTED_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig | None = None) -> torch.dtype:
    """A torch dtype from a torch dtype or a name; "auto" = the checkpoint's dtype or float32."""
    if isinstance(dtype, torch.dtype):
        if dtype in SUPPORTED_DTYPES.values():
            return dtype
        name = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPE_ALIASES.get(dtype, dtype)
        if name == "auto":
            checkpoint_dtype = config.torch_dtype if config is not None else None
            name = checkpoint_dtype if checkpoint_dtype in SUPPORTED_DTYPES else "float32"
        if name in SUPPORTED_DTYPES:
            return SUPPORTED_DTYPES[name]
    raise ModelLoadError(
        f"dtype {name!r} is not supported; supported dtypes: {', '.join(SUPPORTED_DTYPES)}, auto"
    )


def load_config(source: str | Path) -> ModelConfig:
    """The ModelConfig of a preset name or a checkpoint directory."""
    if isinstance(source, str) and is_preset(source):
        return preset_config(source)
    return load_model_config(source)


def load_stage_model(
    source: str | Path,
    stage: StageSpec,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str = "cpu",
    attention_backend: AttentionBackend | None = None,
    layer_ops: LayerOps | None = None,
) -> StageModel:
    """Load the part of the model that `stage` runs; reads only that stage's tensors.

    `source` is a checkpoint directory (config.json + safetensors) or a preset name.
    The returned model's `loaded_tensor_names` lists the checkpoint tensors it read
    (for random presets: the tensors it generated). `layer_ops` as in StageModel.
    """
    config = load_config(source)
    if stage.layer_end > config.num_hidden_layers:
        raise ModelLoadError(
            f"stage {stage.stage_index} wants layers up to {stage.layer_end} but the model "
            f"has {config.num_hidden_layers} layers"
        )
    torch_dtype = resolve_dtype(dtype, config)
    model = StageModel(
        config,
        stage,
        dtype=torch_dtype,
        device=device,
        attention_backend=attention_backend,
        layer_ops=layer_ops,
    )
    shipped = trained_preset_dir(source) if isinstance(source, str) else None
    if shipped is not None:
        model.loaded_tensor_names = _fill_from_checkpoint(model, shipped)
    elif isinstance(source, str) and is_preset(source):
        model.loaded_tensor_names = fill_preset_weights(model, source)
    else:
        model.loaded_tensor_names = _fill_from_checkpoint(model, Path(source))
    return model.eval()


def _fill_from_checkpoint(model: StageModel, directory: Path) -> tuple[str, ...]:
    checkpoint = SafetensorsCheckpoint(directory)
    params = model.checkpoint_parameters()
    # A tied (or head-less) checkpoint: the LM head of the last stage reads the embedding.
    source_of = {name: name for name in params}
    if LM_HEAD_NAME in params and (
        model.config.tie_word_embeddings or LM_HEAD_NAME not in checkpoint
    ):
        source_of[LM_HEAD_NAME] = EMBED_NAME
    targets: dict[str, list[torch.Tensor]] = {}
    for name, checkpoint_name in source_of.items():
        targets.setdefault(checkpoint_name, []).append(params[name])
    shapes = {name: tuple(group[0].shape) for name, group in targets.items()}
    with torch.no_grad():
        for name, tensor in checkpoint.read(targets, shapes):
            for param in targets[name]:
                param.copy_(tensor)
    return tuple(targets)
