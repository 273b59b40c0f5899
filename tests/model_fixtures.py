"""Tiny random Hugging Face checkpoints for tests (built with transformers, saved as safetensors).

    from model_fixtures import make_tiny_checkpoint, load_reference_model
    path = make_tiny_checkpoint(tmp_path, "llama", num_hidden_layers=4)

Weights are seeded and rescaled so that attention is far from uniform and logits are
O(1..10): a numerics mismatch shows up clearly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# What each architecture exercises beyond plain Llama.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "mistral": {
        "sliding_window": 6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
    },
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 24},
}


def _config_class(arch: str):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    if arch not in classes:
        raise ValueError(f"unknown test architecture {arch!r}; choose from {ARCHITECTURES}")
    return classes[arch]


def make_tiny_checkpoint(
    tmp_dir: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    with_tokenizer: bool = False,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint to `tmp_dir/<arch>` and return that directory.

    `overrides` are config fields (e.g. num_hidden_layers=4, sliding_window=None).
    `max_shard_size` (e.g. "20KB") makes a sharded checkpoint with an index file.
    `with_tokenizer` also writes a small word-level tokenizer.json + tokenizer_config.json.
    """
    from transformers import AutoModelForCausalLM

    fields = {**_COMMON, **_ARCH_DEFAULTS[arch], **overrides}
    config = _config_class(arch)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model)
    model = model.to(dtype)
    directory = Path(tmp_dir) / arch
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if with_tokenizer:
        write_word_tokenizer(directory, vocab_size=fields["vocab_size"])
    return directory


def _randomize(model: torch.nn.Module) -> None:
    """Weights with std 1/sqrt(fan_in) (0.5 for embeddings), norms and biases random."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.3)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[-1]))


def load_reference_model(directory: str | Path) -> torch.nn.Module:
    """The transformers model for `directory`: eager attention, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def write_word_tokenizer(directory: Path, vocab_size: int, add_bos: bool = True) -> None:
    """A whitespace word-level tokenizer: <unk>=0, <s>=1, </s>=2, then w3, w4, ... words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


class PagedBatches:
    """Test-side block manager: hands out blocks in a shuffled (non-contiguous) order and
    builds AttentionMetadata + positions for a step of (sequence id, new token count)."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
        self.block_size = block_size
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, new_tokens: list[tuple[int, int]]):
        """-> (AttentionMetadata, positions [T] int64) for sequences getting `count` tokens each."""
        from ppruntime.model.attention import AttentionMetadata

        positions, slots, starts, seq_lens = [], [], [0], []
        for seq_id, count in new_tokens:
            start = self.lengths.get(seq_id, 0)
            end = start + count
            blocks = self.blocks.setdefault(seq_id, [])
            while len(blocks) * self.block_size < end:
                blocks.append(self.free_blocks.pop())
            for pos in range(start, end):
                positions.append(pos)
                slots.append(
                    blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            self.lengths[seq_id] = end
            starts.append(starts[-1] + count)
            seq_lens.append(end)
        width = max(len(self.blocks[seq_id]) for seq_id, _ in new_tokens) + 1
        table = torch.zeros((len(new_tokens), width), dtype=torch.int32)
        for row, (seq_id, _) in enumerate(new_tokens):
            table[row, : len(self.blocks[seq_id])] = torch.tensor(self.blocks[seq_id])
        counts = [count for _, count in new_tokens]
        metadata = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=table,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
        )
        return metadata, torch.tensor(positions, dtype=torch.int64)
