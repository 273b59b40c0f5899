"""ModelConfig: the architecture facts the runtime needs, read from a checkpoint's config.json.

Reads configs written by transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
(`rope_parameters`, plain or nested per attention type with identical entries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppruntime.model.errors import ModelLoadError

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_output_bias: bool = False  # bias on o_proj (Llama/Qwen3 `attention_bias`)
    mlp_bias: bool = False  # bias on gate/up/down (Llama `mlp_bias`)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    sliding_window: int | None = None
    # Per layer: FULL_ATTENTION or SLIDING_ATTENTION. Empty = every layer uses
    # the sliding window if one is set.
    layer_types: tuple[str, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ModelLoadError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )

    def sliding_window_for_layer(self, layer_index: int) -> int | None:
        """The attention window of global layer `layer_index` (None = full causal)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer_index] != SLIDING_ATTENTION:
            return None
        return self.sliding_window


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` (and `generation_config.json` for eos ids) from a checkpoint dir."""
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found: a checkpoint directory needs config.json")
    raw = read_json(config_path)
    generation_path = directory / "generation_config.json"
    generation = read_json(generation_path) if generation_path.is_file() else {}
    return config_from_dict(raw, source=str(config_path), generation_config=generation)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def config_from_dict(
    raw: dict[str, Any],
    *,
    source: str = "config.json",
    generation_config: dict[str, Any] | None = None,
) -> ModelConfig:
    """Build a ModelConfig from the contents of a transformers config.json."""
    architecture = _architecture(raw, source)
    for name in _REQUIRED_FIELDS:
        if name not in raw:
            raise ModelLoadError(f"{source}: required field {name!r} is missing")

    def integer(name: str, default: int | None = None, minimum: int = 1) -> int:
        value = raw.get(name)
        return (
            default
            if value is None and default is not None
            else _int_field(name, value, source, minimum)
        )

    num_heads = integer("num_attention_heads")
    hidden = integer("hidden_size")
    num_layers = integer("num_hidden_layers")
    values = dict(
        vocab_size=integer("vocab_size"),
        intermediate_size=integer("intermediate_size"),
        num_key_value_heads=integer("num_key_value_heads", num_heads),
        head_dim=integer("head_dim", hidden // num_heads),
        rms_norm_eps=_float_field("rms_norm_eps", raw.get("rms_norm_eps", 1e-6), source),
        max_position_embeddings=integer("max_position_embeddings", 2048, minimum=2),
    )
    rope_theta, rope_scaling = _rope_settings(raw, source)
    sliding_window, layer_types = _sliding_window(raw, architecture, num_layers, source)
    qkv_bias, output_bias = _attention_biases(raw, architecture)
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ModelLoadError(f"{source}: hidden_act={activation!r} is not supported (only silu)")
    bos_token_id = _optional_int(raw.get("bos_token_id"), "bos_token_id", source)
    eos_token_ids = _eos_ids(raw, generation_config or {}, source)
    try:
        return ModelConfig(
            architecture=architecture,
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            **values,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_output_bias=output_bias,
            mlp_bias=architecture == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=architecture == "qwen3",
            sliding_window=sliding_window,
            layer_types=layer_types,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_token_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )
    except ModelLoadError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None


def _int_field(name: str, value: Any, source: str, minimum: int | None = 1) -> int:
    """A config.json integer (2048.0 is taken as 2048); anything else names the field."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{source}: field {name!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ModelLoadError(f"{source}: field {name!r} must be at least {minimum}, got {value}")
    return value


def _float_field(name: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelLoadError(f"{source}: field {name!r} must be a positive number, got {value!r}")
    return float(value)


def _architecture(raw: dict[str, Any], source: str) -> str:
    supported = ", ".join(ARCHITECTURES)
    names = raw.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if names:
        raise ModelLoadError(
            f"{source}: architecture {', '.join(map(str, names))} is not supported; "
            f"supported architectures: {supported}"
        )
    model_type = raw.get("model_type")
    if model_type in ARCHITECTURES.values():
        return str(model_type)
    raise ModelLoadError(
        f"{source}: no supported 'architectures' entry (model_type={model_type!r}); "
        f"supported architectures: {supported}"
    )


def _rope_settings(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from 4.x or 5.x style keys."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
    else:
        params = _flatten_per_attention_type(dict(params), source)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", _DEFAULT_ROPE_THETA))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelLoadError(f"{source}: partial_rotary_factor={partial} is not supported")
    theta = _float_field("rope_theta", theta, source)
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault(
            "original_max_position_embeddings", raw.get("max_position_embeddings", 2048)
        )
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in scaling:
                raise ModelLoadError(f"{source}: llama3 rope scaling needs {key!r}")
    if rope_type == "linear" and "factor" not in scaling:
        raise ModelLoadError(f"{source}: linear rope scaling needs 'factor'")
    return theta, scaling


def _flatten_per_attention_type(params: dict[str, Any], source: str) -> dict[str, Any]:
    """5.x may nest rope parameters per attention type; accept it when all agree."""
    nested = [v for v in params.values() if isinstance(v, dict)]
    if not nested:
        return params
    first = nested[0]
    if any(other != first for other in nested[1:]):
        raise ModelLoadError(
            f"{source}: rope_parameters differ per attention type; this is not supported"
        )
    return dict(first)


def _sliding_window(
    raw: dict[str, Any], architecture: str, num_layers: int, source: str
) -> tuple[int | None, tuple[str, ...]]:
    window = _optional_int(raw.get("sliding_window"), "sliding_window", source)
    if architecture in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            return None, ()
        layer_types = raw.get("layer_types")
        if not layer_types:
            max_window_layers = _int_field(
                "max_window_layers", raw.get("max_window_layers", num_layers), source, 0
            )
            layer_types = [
                SLIDING_ATTENTION if i >= max_window_layers else FULL_ATTENTION
                for i in range(num_layers)
            ]
        return window, tuple(layer_types)
    layer_types = raw.get("layer_types")
    return window, tuple(layer_types) if layer_types else ()


def _attention_biases(raw: dict[str, Any], architecture: str) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj), as each architecture builds its projections."""
    if architecture == "qwen2":
        return True, False
    if architecture == "mistral":
        return False, False
    bias = bool(raw.get("attention_bias", False))
    return bias, bias


def _optional_int(value: Any, name: str, source: str) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    return _int_field(name, value, source, minimum=0)


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any], source: str) -> tuple[int, ...]:
    value = generation.get("eos_token_id", raw.get("eos_token_id"))
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(_int_field("eos_token_id", v, source, minimum=0) for v in values)
