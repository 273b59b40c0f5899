"""When the device computed each microbatch, for the `--trace` timeline.

The executor's host spans time what the host thread does. On the CPU that is the
computation itself; on CUDA a forward only launches kernels (a graph replay takes
microseconds), so the host spans cannot tell when the GPU was busy. While tracing,
the executor also brackets each microbatch's forward (and sampling on the last
stage) with a device span, named "device-decode" (every sequence brings one token)
or "device-prefill" (any prompt tokens in it), with the batch's sizes in its args
(seqs, tokens, and context_tokens: the KV positions its attention reads):

- CPU: host wall-clock time around the same calls (they are the computation);
- CUDA: timing events recorded on the compute stream; the GPU timestamps are turned
  into host time through one anchor event recorded on an idle GPU, so the spans
  line up with the host spans of every rank on the host.

Events are resolved at the end (`events()`): recording one costs microseconds and
never waits for the device. Disabled tracing records nothing.

`shared_device_seconds` turns the spans of several ranks into each rank's device time
where ranks share a GPU (scripts/bench_pipeline.py's per-stage time on CUDA).
"""

from __future__ import annotations

import time

import numpy as np
import torch

DECODE_SPAN = "device-decode"
PREFILL_SPAN = "device-prefill"
DEVICE_SPANS = (DECODE_SPAN, PREFILL_SPAN)

# name, start, end (host seconds), microbatch, {"seqs", "tokens", "context_tokens"}
Event = tuple[str, float, float, int, dict]


def batch_sizes(batch) -> dict:
    """What the roofline of this microbatch needs (batch: a ScheduledBatch)."""
    return {
        "seqs": batch.num_seqs,
        "tokens": batch.num_tokens,
        "context_tokens": int((batch.starts.astype(np.int64) + batch.num_new).sum()),
    }


class DeviceSpans:
    """Disabled: records nothing."""

    def begin(self) -> object:
        return None

    def end(self, mark: object, name: str, batch) -> None:
        pass

    def events(self) -> list[Event]:
        return []


class HostDeviceSpans(DeviceSpans):
    """CPU: the device is this process, its busy time is the host's wall clock."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def begin(self) -> object:
        return time.time()

    def end(self, mark: object, name: str, batch) -> None:
        self._events.append((name, mark, time.time(), batch.batch_id, batch_sizes(batch)))

    def events(self) -> list[Event]:
        return list(self._events)


class CudaDeviceSpans(DeviceSpans):
    """CUDA: a pair of timing events on the current stream per microbatch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int, dict]] = []
        torch.cuda.synchronize(device)
        self._anchor = torch.cuda.Event(enable_timing=True)
        before = time.time()
        self._anchor.record(torch.cuda.current_stream(device))
        self._anchor.synchronize()
        # the GPU was idle: it reached the anchor between these two host readings
        self._anchor_host_s = (before + time.time()) / 2

    def begin(self) -> object:
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(self.device))
        return start

    def end(self, mark: object, name: str, batch) -> None:
        stop = torch.cuda.Event(enable_timing=True)
        stop.record(torch.cuda.current_stream(self.device))
        self._pending.append((name, mark, stop, batch.batch_id, batch_sizes(batch)))

    def events(self) -> list[Event]:
        torch.cuda.synchronize(self.device)
        anchor, origin = self._anchor, self._anchor_host_s
        return [
            (
                name,
                origin + anchor.elapsed_time(start) / 1e3,
                origin + anchor.elapsed_time(stop) / 1e3,
                microbatch,
                sizes,
            )
            for name, start, stop, microbatch, sizes in self._pending
        ]


def make_device_spans(device: torch.device, enabled: bool) -> DeviceSpans:
    if not enabled:
        return DeviceSpans()
    if device.type == "cuda":
        return CudaDeviceSpans(device)
    return HostDeviceSpans()


def shared_device_seconds(
    spans_by_rank: dict[int, list[tuple[float, float]]], device_of_rank: dict[int, object]
) -> dict[int, float]:
    """Each rank's device time from its device spans (start, end), counting that ranks on
    one device share it: wherever k ranks of one device have a span open at once, each
    is given 1/k of that time. A GPU time-slices between processes, so two ranks' spans
    on one GPU overlap and each holds the other's kernels too; ranks on devices of their
    own (distinct `device_of_rank` values) get their spans' whole time."""
    seconds = {rank: 0.0 for rank in spans_by_rank}
    groups: dict[object, list[int]] = {}
    for rank in spans_by_rank:
        groups.setdefault(device_of_rank[rank], []).append(rank)
    for ranks in groups.values():
        edges = []  # (time, +1 opens / -1 closes, rank): each rank's spans as their union
        for rank in ranks:
            for start, end in _union(spans_by_rank[rank]):
                edges += [(start, 1, rank), (end, -1, rank)]
        edges.sort(key=lambda edge: (edge[0], edge[1]))
        open_ranks: set[int] = set()
        previous = None
        for moment, change, rank in edges:
            if open_ranks and previous is not None and moment > previous:
                share = (moment - previous) / len(open_ranks)
                for holder in open_ranks:
                    seconds[holder] += share
            previous = moment
            if change > 0:
                open_ranks.add(rank)
            else:
                open_ranks.discard(rank)
    return seconds


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]
