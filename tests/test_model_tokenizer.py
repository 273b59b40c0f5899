"""Tokenizers: byte-level presets and checkpoint tokenizer.json files."""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import make_tiny_checkpoint

from ppruntime.model import (
    ByteTokenizer,
    TokenizerUnavailableError,
    load_tokenizer,
    require_tokenizer,
)


def test_byte_tokenizer_round_trip():
    tokenizer = load_tokenizer("tiny")
    assert isinstance(tokenizer, ByteTokenizer)
    ids = tokenizer.encode("héllo")
    assert ids.dtype == np.int32 and ids.flags["C_CONTIGUOUS"]
    assert ids[0] == tokenizer.bos_token_id == 256
    assert tokenizer.eos_token_ids == (257,) and tokenizer.vocab_size == 512
    assert tokenizer.decode(ids) == "héllo"
    assert tokenizer.decode([104, 257, 105, 400]) == "hi"
    assert tokenizer.decode([0xC3]) == "\ufffd"


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tok"), "llama", num_hidden_layers=1, with_tokenizer=True
    )


def test_file_tokenizer(checkpoint_with_tokenizer):
    tokenizer = load_tokenizer(checkpoint_with_tokenizer)
    ids = tokenizer.encode("w5 w7 w5")
    assert ids.dtype == np.int32
    assert ids.tolist() == [1, 5, 7, 5]  # bos prepended: add_bos_token is true
    assert tokenizer.decode(ids) == "w5 w7 w5"
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == (2,)
    assert tokenizer.vocab_size == 300


def test_checkpoint_without_tokenizer(tmp_path):
    directory = make_tiny_checkpoint(tmp_path, "qwen3", num_hidden_layers=1)
    assert load_tokenizer(directory) is None
    with pytest.raises(TokenizerUnavailableError, match="has no tokenizer.json"):
        require_tokenizer(None, directory)
