"""Tokenizers: a checkpoint's tokenizer.json (via the `tokenizers` library) or byte-level.

`load_tokenizer(source)` returns None when a checkpoint directory has no tokenizer.json:
token-id prompts still work; callers raise `TokenizerUnavailableError` (see
`require_tokenizer`) only when text must actually be encoded or decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ppruntime.model.config import load_model_config, read_json
from ppruntime.model.errors import ModelLoadError
from ppruntime.model.presets import BYTE_BOS_ID, BYTE_EOS_ID, is_preset, preset_config


class TokenizerUnavailableError(ModelLoadError):
    """Text was given or requested but the model has no tokenizer."""


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...  # int32, contiguous

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str: ...


class ByteTokenizer:
    """ids 0..255 are bytes; `bos_token_id` and `eos_token_ids` are specials above 255."""

    def __init__(
        self,
        vocab_size: int,
        bos_token_id: int = BYTE_BOS_ID,
        eos_token_ids: tuple[int, ...] = (BYTE_EOS_ID,),
        add_bos: bool = True,
    ) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos

    def encode(self, text: str) -> np.ndarray:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        ids = np.empty(len(data) + int(self.add_bos), dtype=np.int32)
        if self.add_bos:
            ids[0] = self.bos_token_id
        ids[int(self.add_bos) :] = data
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        array = np.asarray(ids, dtype=np.int64)
        array = array[(array >= 0) & (array < 256)]  # specials and unused ids carry no bytes
        return array.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of `ids` (specials and unused ids carry none): `decode` is these bytes
        as UTF-8, so streamed text can be decoded byte by byte (IncrementalDetokenizer)."""
        return bytes(token for token in ids if 0 <= token < 256)


class FileTokenizer:
    """A checkpoint's tokenizer.json, loaded with the `tokenizers` library."""

    def __init__(
        self,
        rust_tokenizer: object,  # tokenizers.Tokenizer
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
    ) -> None:
        self._tokenizer = rust_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos and bos_token_id is not None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids  # post-processor runs
        if self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return np.ascontiguousarray(ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        id_list = np.asarray(ids, dtype=np.int64).tolist()
        return self._tokenizer.decode(id_list, skip_special_tokens=skip_special_tokens)


def load_tokenizer(source: str | Path) -> Tokenizer | None:
    """The tokenizer of a preset name or a checkpoint directory (None: no tokenizer.json)."""
    if isinstance(source, str) and is_preset(source):
        config = preset_config(source)
        return ByteTokenizer(
            config.vocab_size, config.bos_token_id or BYTE_BOS_ID, config.eos_token_ids
        )
    directory = Path(source)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        return None
    config = load_model_config(directory)
    settings_path = directory / "tokenizer_config.json"
    settings = read_json(settings_path) if settings_path.is_file() else {}
    rust = _read_tokenizer_json(tokenizer_path)
    named = _special_ids_named_in(settings, rust)
    bos = config.bos_token_id if config.bos_token_id is not None else named.get("bos_token")
    eos = config.eos_token_ids or tuple(v for v in [named.get("eos_token")] if v is not None)
    return FileTokenizer(rust, bos, eos, add_bos=bool(settings.get("add_bos_token")))


def require_tokenizer(tokenizer: Tokenizer | None, source: str | Path) -> Tokenizer:
    """`tokenizer`, or a clear error when text is needed and the model has none."""
    if tokenizer is None:
        raise TokenizerUnavailableError(
            f"{source} has no tokenizer.json: give prompts as token ids, "
            "or add a tokenizer.json to the checkpoint directory"
        )
    return tokenizer


def _read_tokenizer_json(path: Path):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer as RustTokenizer

    try:
        return RustTokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer {path}: {exc}") from None


def _special_ids_named_in(settings: dict, rust) -> dict[str, int]:
    """Ids of the bos/eos tokens that tokenizer_config.json names, where it names them."""
    found: dict[str, int] = {}
    for key in ("bos_token", "eos_token"):
        token = settings.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            token_id = rust.token_to_id(token)
            if token_id is not None:
                found[key] = token_id
    return found
