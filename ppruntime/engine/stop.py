"""Stop-string detection over streamed text deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def find_first_stop(text: str, stop_strings: Sequence[str]) -> tuple[int, str] | None:
    """Earliest ``(index, stop_string)`` in ``text``; at equal index the longest wins."""
    best: tuple[int, str] | None = None
    for stop in stop_strings:
        index = text.find(stop)
        if index < 0:
            continue
        if best is None or index < best[0] or (index == best[0] and len(stop) > len(best[1])):
            best = (index, stop)
    return best


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, str | None]:
    """Cut ``text`` before the first stop string; return ``(text, matched or None)``."""
    found = find_first_stop(text, stop_strings)
    if found is None:
        return text, None
    index, stop = found
    return text[:index], stop


@dataclass(frozen=True)
class StopCheck:
    text: str  # text that is safe to emit now (never contains any part of a stop string)
    matched: str | None  # the stop string found, or None


class StopStringMatcher:
    """Finds the first stop string in a request's streamed text (one per request).

    ``feed`` takes each text delta and returns the text safe to emit. A tail of the
    stream that could be the beginning of a stop string is held back until the next
    delta decides it, so a stop string spanning deltas is found and never leaks into
    the output. Once a stop string is found, the text before it is returned with the
    match and the matcher is finished. ``flush`` returns the held-back tail when the
    request ends for another reason.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if isinstance(stop_strings, str):
            stop_strings = (stop_strings,)
        if not stop_strings or not all(stop_strings):
            raise ValueError(f"stop strings must be non-empty, got {stop_strings!r}")
        self._stop_strings = tuple(stop_strings)
        self._max_hold = max(len(stop) for stop in self._stop_strings) - 1
        self._held = ""
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        return self._matched

    @property
    def finished(self) -> bool:
        return self._matched is not None

    def feed(self, delta: str) -> StopCheck:
        if self._matched is not None:
            return StopCheck("", self._matched)
        # Emitted text holds no stop-string start, so any match begins in `buffer`.
        buffer = self._held + delta
        found = find_first_stop(buffer, self._stop_strings)
        if found is not None:
            index, stop = found
            self._held = ""
            self._matched = stop
            return StopCheck(buffer[:index], stop)
        hold = self._partial_stop_suffix_len(buffer)
        self._held = buffer[len(buffer) - hold :]
        return StopCheck(buffer[: len(buffer) - hold], None)

    def flush(self) -> str:
        """Release the held-back tail (the stream ended without a stop string)."""
        held, self._held = self._held, ""
        return held

    def _partial_stop_suffix_len(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that begins some stop string."""
        for length in range(min(len(buffer), self._max_hold), 0, -1):
            suffix = buffer[-length:]
            if any(stop.startswith(suffix) for stop in self._stop_strings):
                return length
        return 0
