"""What a rank reports of its busy time (engine/rank_stats.py carries it to rank 0), and
the busy fraction between two reports: pure, no MPI, so the HTTP process of `ppruntime
serve` renders `/metrics` without loading MPI."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BusyReport:
    """One rank's cumulative busy time at `now` (both on that rank's monotonic clock), and
    its COUNTERS as of then (empty where a sender gave none)."""

    started: float
    now: float
    busy_s: float
    counters: dict = field(default_factory=dict)


def busy_fraction(previous: BusyReport | None, current: BusyReport) -> float | None:
    """Share of wall time between two reports of one rank spent busy, in [0, 1]; from the
    rank's start when there is no previous one; None when no time passed."""
    since, busy_before = (
        (current.started, 0.0) if previous is None else (previous.now, previous.busy_s)
    )
    elapsed = current.now - since
    if elapsed <= 0:
        return None
    return min(max((current.busy_s - busy_before) / elapsed, 0.0), 1.0)
