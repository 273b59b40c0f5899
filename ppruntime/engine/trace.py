"""Timeline events of one rank (forward, send, receive-wait, sample, relay, handle, idle).

Disabled by default: `span()` then costs one attribute check. Enabled by `--trace`;
rank 0 gathers every rank's events at shutdown and writes one Chrome trace JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Tracer:
    def __init__(self, rank: int, enabled: bool) -> None:
        self.rank = rank
        self.enabled = enabled
        self.events: list[tuple[str, float, float, int]] = []  # name, start, end, microbatch
        self.busy_s: dict[str, float] = {}
        self.origin = time.time()

    @contextmanager
    def span(self, name: str, microbatch: int = -1) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            end = time.time()
            self.busy_s[name] = self.busy_s.get(name, 0.0) + (end - start)
            if self.enabled:
                self.events.append((name, start, end, microbatch))


def chrome_trace(per_rank_events: list[list[tuple[str, float, float, int]]], origin: float) -> dict:
    """Merge ranks' events into the Chrome trace format (pid 0, tid = rank)."""
    events = []
    for rank, rank_events in enumerate(per_rank_events):
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": rank,
                "args": {"name": f"rank {rank}"},
            }
        )
        for name, start, end, microbatch in rank_events:
            events.append(
                {
                    "name": name,
                    "ph": "X",
                    "pid": 0,
                    "tid": rank,
                    "ts": (start - origin) * 1e6,
                    "dur": max(end - start, 0.0) * 1e6,
                    "args": {"microbatch": microbatch},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, per_rank_events: list, origin: float) -> None:
    with open(path, "w") as handle:
        json.dump(chrome_trace(per_rank_events, origin), handle)
