"""Model shapes, random checkpoints and the device copy bandwidth, shared by the GPU
benchmarks (scripts/bench_gpu.py, scripts/bench_pp_gpus.py).

A `Shape` is the architecture of a Llama checkpoint (no weights): its HF config, its
weight bytes and KV bytes, its prefill FLOPs. `write_checkpoint` makes a random bf16
checkpoint of it with transformers' tensor names (no download, no tokenizer).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch


# -- shapes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": 500000.0,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000 % self.vocab_size,
            "eos_token_id": 128001 % self.vocab_size,
            "torch_dtype": "bfloat16",
        }

    @property
    def layer_params(self) -> int:
        """Matmul weights of one decoder layer."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return self.hidden_size * (2 * q + 2 * kv) + 3 * self.hidden_size * self.intermediate_size

    def weight_bytes_per_step(self, element_bytes: int = 2) -> int:
        """Bytes of weights a decode step reads: every layer, the norms, the LM head."""
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        head = self.vocab_size * self.hidden_size
        return (self.num_hidden_layers * self.layer_params + norms + head) * element_bytes

    def kv_bytes_per_token_layer(self, element_bytes: int = 2) -> int:
        """K and V of one token in one decoder layer."""
        return 2 * self.num_key_value_heads * self.head_dim * element_bytes

    def kv_bytes_per_token(self, element_bytes: int = 2) -> int:
        return self.num_hidden_layers * self.kv_bytes_per_token_layer(element_bytes)

    def head_bytes(self, element_bytes: int = 2) -> int:
        """The final norm and the LM head (the last stage reads them every step)."""
        return (self.vocab_size + 1) * self.hidden_size * element_bytes

    def checkpoint_bytes(self, element_bytes: int = 2) -> int:
        """Every stored tensor: embedding, layers (matmuls + 2 norms), final norm, head."""
        layers = self.num_hidden_layers * (self.layer_params + 2 * self.hidden_size)
        embedding = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (layers + embedding + head + self.hidden_size) * element_bytes

    def with_layers(self, num_layers: int) -> Shape:
        return replace(self, name=f"{self.name}-{num_layers}l", num_hidden_layers=num_layers)

    def prefill_flops(self, num_seqs: int, prompt_len: int) -> float:
        """Matmul FLOPs of the prompts (LM head on the last token only) plus causal attention."""
        tokens = num_seqs * prompt_len
        linear = 2.0 * tokens * self.num_hidden_layers * self.layer_params
        head = 2.0 * num_seqs * self.hidden_size * self.vocab_size
        attention = self.num_hidden_layers * attention_prefill_flops(
            num_seqs, prompt_len, self.num_attention_heads, self.head_dim
        )
        return linear + head + attention


def attention_prefill_flops(num_seqs: int, seq_len: int, heads: int, head_dim: int) -> float:
    """QK^T and PV of causal attention: 2 matmuls x 2 FLOPs x D x heads x S(S+1)/2."""
    return num_seqs * 2.0 * head_dim * heads * seq_len * (seq_len + 1)


LLAMA3_ROPE_1B = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "1b": Shape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 64, 128256, True, LLAMA3_ROPE_1B),
    "8b": Shape(
        "llama-3.1-8b",
        4096,
        14336,
        32,
        32,
        8,
        128,
        128256,
        False,
        {**LLAMA3_ROPE_1B, "factor": 8.0},
    ),
    "70b": Shape(
        "llama-3.1-70b",
        8192,
        28672,
        80,
        64,
        8,
        128,
        128256,
        False,
        {**LLAMA3_ROPE_1B, "factor": 8.0},
    ),
    "small": Shape("small", 64, 128, 2, 4, 2, 16, 512, True, LLAMA3_ROPE_1B, 2048),  # tied, as 1B
    # the 70B's proportions, tiny: untied head, 8 query heads per KV head (CPU dry runs)
    "small-70b": Shape("small-70b", 128, 448, 80, 8, 1, 16, 512, False, LLAMA3_ROPE_1B, 2048),
}


# -- the device copy bandwidth (the HBM roofline's denominator) ------------------------------
class Timer:
    """Wall time of a block; on CUDA synchronised before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self):
        self.sync()
        started = time.perf_counter()
        box = {}
        yield box
        self.sync()
        box["s"] = time.perf_counter() - started


def time_op(fn, timer: Timer, repeats: int) -> float:
    fn()  # warm-up
    with timer() as box:
        for _ in range(repeats):
            fn()
    return box["s"] / repeats


def replayed_seconds(fn, calls: int, device: torch.device) -> float:
    """Seconds one call of `fn` takes, replayed from a CUDA graph of `calls` back-to-back
    calls (no host launch cost in the time; median of 5 replays); on the CPU, wall time."""
    fn()  # compile / warm up outside the capture
    if device.type != "cuda":
        return time_op(fn, Timer(device), 2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, small: bool) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and written."""
    size = (32 << 20) if small else (2 << 30)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * size / time_op(lambda: target.copy_(source), Timer(device), 3 if small else 10)


# -- checkpoints -------------------------------------------------------------------------------
def write_checkpoint(shape: Shape, directory: Path, device: torch.device) -> Path:
    """A random bf16 checkpoint with transformers' tensor names, written shard by shard."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape.hf_config())
    config.save_pretrained(directory)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {
        name: tuple(tensor.shape)
        for name, tensor in skeleton.state_dict().items()
        if not (shape.tie_word_embeddings and name == "lm_head.weight")
    }
    del skeleton
    generator = torch.Generator(device=device).manual_seed(0)
    shard_limit = 4 << 30
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    sizes = {"shard": 0, "total": 0, "files": 0}

    def flush() -> None:
        sizes["files"] += 1
        file_name = f"model-{sizes['files']:05d}.safetensors"
        save_file(shard, str(directory / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        shard.clear()
        sizes["shard"] = 0

    for name, tensor_shape in names.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(tensor_shape, dtype=torch.bfloat16, device=device)
        else:
            std = 1.0 / math.sqrt(tensor_shape[-1]) if "embed" not in name else 1.0
            tensor = torch.randn(tensor_shape, generator=generator, device=device)
            tensor = (tensor * std).to(torch.bfloat16)
        shard[name] = tensor.cpu()
        sizes["shard"] += tensor.numel() * 2
        sizes["total"] += tensor.numel() * 2
        if sizes["shard"] >= shard_limit:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": sizes["total"]}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def reuse_or_write_checkpoint(shape: Shape, directory: Path, device: torch.device) -> bool:
    """write_checkpoint unless `directory` already holds a complete one of this shape
    (its index is written last). True when it was written now."""
    index = directory / "model.safetensors.index.json"
    config = directory / "config.json"
    if index.is_file() and config.is_file():
        wanted = shape.hf_config()
        found = json.loads(config.read_text())
        keys = [key for key in wanted if key.endswith(("_size", "_heads", "_layers", "head_dim"))]
        if all(found.get(key) == wanted[key] for key in keys):
            return False
    write_checkpoint(shape, directory, device)
    return True
