"""Incremental detokenization: turn newly generated token ids into text deltas."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol

import numpy as np

REPLACEMENT_CHAR = "\ufffd"

# Already-emitted tokens decoded ahead of the pending ones (prompt tokens at first), so
# that tokenizers that drop a leading space when decoding a lone token (SentencePiece)
# still space the delta right.
CONTEXT_TOKENS = 5

# A multi-byte UTF-8 character spans at most 4 byte-level tokens; past this many
# undecodable tokens the bytes are truly invalid and are emitted as replacement chars.
MAX_PENDING_TOKENS = 8


class Tokenizer(Protocol):
    """decode is required. A tokenizer whose text is its tokens' bytes as UTF-8, one
    token after another, may also offer `token_bytes(ids) -> bytes` (the bytes of `ids`,
    specials carrying none): its text is then decoded as those bytes arrive, without
    decoding windows of tokens again."""

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Decodes a request's generated tokens into text, one delta per ``append``.

    Only a bounded window of recent tokens is decoded on each call: the last
    ``CONTEXT_TOKENS`` emitted tokens (``prefix``, for context) plus the tokens not yet
    emitted (``pending``). The delta is the text the pending tokens add after the prefix.
    A delta ending in an incomplete UTF-8 character (decoded as ``"\\ufffd"``) is held
    back until a later token completes it, or until ``MAX_PENDING_TOKENS`` tokens
    are pending, or until ``flush``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | np.ndarray = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # byte-level tokenizers: an incremental UTF-8 decoder holds back an incomplete
        # character (and replaces invalid bytes) exactly as decoding all bytes at once does
        self._token_bytes = getattr(tokenizer, "token_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        context = prompt_token_ids[-CONTEXT_TOKENS:] if len(prompt_token_ids) else ()
        # Window of token ids: [prefix tokens | pending tokens]
        self._window: list[int] = [int(token) for token in context]
        self._prefix_len = len(self._window)
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def append(self, new_token_ids: Sequence[int] | np.ndarray) -> str:
        """Add newly generated tokens; return the text they complete (maybe "")."""
        if self._token_bytes is not None:
            if isinstance(new_token_ids, np.ndarray):
                new_token_ids = new_token_ids.tolist()
            return self._keep(self._utf8.decode(self._token_bytes(new_token_ids)))
        if isinstance(new_token_ids, np.ndarray):
            self._window.extend(new_token_ids.tolist())
        else:
            self._window.extend(int(token) for token in new_token_ids)
        return self._emit(force=False)

    def flush(self) -> str:
        """Emit whatever is held back (call once the request has finished)."""
        if self._token_bytes is not None:
            return self._keep(self._utf8.decode(b"", final=True))
        return self._emit(force=True)

    def _keep(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta

    def _emit(self, force: bool) -> str:
        num_pending = len(self._window) - self._prefix_len
        if num_pending == 0:
            return ""
        prefix_text = self._decode(self._window[: self._prefix_len])
        full_text = self._decode(self._window)
        complete = len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR)
        if not (complete or force or num_pending >= MAX_PENDING_TOKENS):
            return ""
        delta = full_text[len(prefix_text) :]
        # The last few emitted tokens become the next prefix.
        del self._window[: max(len(self._window) - CONTEXT_TOKENS, 0)]
        self._prefix_len = len(self._window)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes excluded until they resolve)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""
