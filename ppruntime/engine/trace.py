"""Timeline events of one rank (forward, send, receive-wait, sample, relay, handle, idle).

Disabled by default: `span()` then costs one attribute check. Enabled by `--trace`;
rank 0 gathers every rank's events at shutdown and writes one Chrome trace JSON.
"""

from __future__ import annotations

import json
import time

# Every span's CPU time is kept beside its wall time (a thread-clock read costs ~0.3 us,
# a handful of spans an iteration): where a rank's CPU goes, by span, is what tells a
# serving rank from an offline one (bench_serve.py's per-rank table)


class Tracer:
    def __init__(self, rank: int, enabled: bool) -> None:
        self.rank = rank
        self.enabled = enabled
        self.events: list[tuple[str, float, float, int]] = []  # name, start, end, microbatch
        self.busy_s: dict[str, float] = {}
        # this thread's CPU time inside each span: unlike wall time it does not grow while
        # other processes share the cores (the layer-partition probe times "forward")
        self.busy_cpu_s: dict[str, float] = {}
        self.origin = time.time()

    def span(self, name: str, microbatch: int = -1) -> _Span:
        """Time the block as `name` (a plain class: cheaper than a generator context)."""
        return _Span(self, name, microbatch)


class _Span:
    __slots__ = ("tracer", "name", "microbatch", "start", "cpu_start")

    def __init__(self, tracer: Tracer, name: str, microbatch: int) -> None:
        self.tracer = tracer
        self.name = name
        self.microbatch = microbatch

    def __enter__(self) -> None:
        self.start = time.time()
        self.cpu_start = time.thread_time()

    def __exit__(self, *exc_info: object) -> None:
        end = time.time()
        tracer = self.tracer
        busy = tracer.busy_s
        busy[self.name] = busy.get(self.name, 0.0) + (end - self.start)
        busy_cpu = tracer.busy_cpu_s
        cpu = time.thread_time() - self.cpu_start
        busy_cpu[self.name] = busy_cpu.get(self.name, 0.0) + cpu
        if tracer.enabled:
            tracer.events.append((self.name, self.start, end, self.microbatch))


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
        for name, start, end, microbatch, *extra in rank_events:
            # a device span (ppruntime/stage/device_spans.py) adds a dict of its batch's sizes
            args = {"microbatch": microbatch, **(extra[0] if extra else {})}
            events.append(
                {
                    "name": name,
                    "ph": "X",
                    "pid": 0,
                    "tid": rank,
                    "ts": (start - origin) * 1e6,
                    "dur": max(end - start, 0.0) * 1e6,
                    "args": args,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str, per_rank_events: list, origin: float) -> None:
    with open(path, "w") as handle:
        json.dump(chrome_trace(per_rank_events, origin), handle)
