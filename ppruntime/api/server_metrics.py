"""`GET /metrics`: the server's figures in the Prometheus text format."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from ppruntime.engine.busy_report import BusyReport, busy_fraction

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyCounts:
    """A latency histogram in bounded memory, kept by the engine since start-up: how many
    values fell in each LATENCY_BUCKETS bucket (value <= bound; the last count: above
    every bound) and their sum. The whole state crosses the link with each "stats"
    message, so nothing grows between scrapes, however rare they are."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """`count` values of `seconds` each (a delta of several tokens: its gap shared)."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += count
        self.sum_s += seconds * count

    def to_wire(self) -> list:
        return [list(self.counts), self.sum_s]

    @classmethod
    def from_wire(cls, wire: list) -> LatencyCounts:
        counts, sum_s = wire
        if len(counts) != len(LATENCY_BUCKETS) + 1:
            raise ValueError(
                f"a latency histogram needs {len(LATENCY_BUCKETS) + 1} counts, got {len(counts)}"
            )
        latency = cls()
        latency.counts = [int(count) for count in counts]
        latency.sum_s = float(sum_s)
        return latency

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (upper bound, values <= it), "+Inf" last."""
        running, buckets = 0, []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class ServingStats:
    """The engine's figures for /metrics, as of one "stats" message from the engine process."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    busy_s: float = 0.0
    rank_busy: dict = field(default_factory=dict)  # rank -> engine.busy_report.BusyReport
    # latencies measured by the engine, since start-up
    ttft: LatencyCounts = field(default_factory=LatencyCounts)
    itl: LatencyCounts = field(default_factory=LatencyCounts)

    @classmethod
    def from_wire(cls, figures: dict) -> ServingStats:
        values = dict(figures)
        values["rank_busy"] = {
            int(rank): BusyReport(*report) for rank, report in values["rank_busy"].items()
        }
        values["ttft"] = LatencyCounts.from_wire(values["ttft"])
        values["itl"] = LatencyCounts.from_wire(values["itl"])
        return cls(**values)


class ServerMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        self.content_type = CONTENT_TYPE_LATEST
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests_total = Counter(
            "ppruntime_http_requests", "HTTP generation requests", ["endpoint"], registry=registry
        )
        self.running = Gauge(
            "ppruntime_requests_running", "sequences in the pipeline", registry=registry
        )
        self.waiting = Gauge(
            "ppruntime_requests_waiting", "sequences waiting to be scheduled", registry=registry
        )
        self.kv_used = Gauge(
            "ppruntime_kv_blocks_used", "KV cache blocks in use (every rank)", registry=registry
        )
        self.kv_total = Gauge(
            "ppruntime_kv_blocks_total", "KV cache blocks per rank", registry=registry
        )
        self.tokens = Counter("ppruntime_generated_tokens", "tokens generated", registry=registry)
        self.finished = Counter(
            "ppruntime_requests_finished", "requests finished", registry=registry
        )
        self.tokens_per_s = Gauge(
            "ppruntime_generation_tokens_per_second",
            "tokens generated per second since the previous scrape",
            registry=registry,
        )
        self.busy = Gauge(
            "ppruntime_rank_busy_fraction",
            "share of wall time a rank spent in its stage's forward since the previous scrape "
            "(ranks > 0: between their reports to rank 0, about one a second)",
            ["rank"],
            registry=registry,
        )
        self.busy_seconds = Counter(
            "ppruntime_rank_busy_seconds",
            "seconds a rank spent in its stage's forward (ranks > 0: as last reported)",
            ["rank"],
            registry=registry,
        )
        self._latencies = _LatencyCollector()
        registry.register(self._latencies)
        self._rank_counters = _RankCounterCollector()
        registry.register(self._rank_counters)
        self._last = (time.monotonic(), 0, 0.0)  # (when, tokens, busy seconds)
        self._finished_seen = 0
        self._reports_seen: dict[int, BusyReport] = {}  # ranks > 0: report of the last scrape

    def render(self, stats: ServingStats) -> bytes:
        from prometheus_client import generate_latest

        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_total.set(stats.kv_blocks_total)
        when, tokens, busy = self._last
        now = time.monotonic()
        elapsed = max(now - when, 1e-9)
        new_tokens = stats.generated_tokens - tokens
        self.tokens.inc(new_tokens)
        self.tokens_per_s.set(new_tokens / elapsed)
        self.busy.labels("0").set(min((stats.busy_s - busy) / elapsed, 1.0))
        self.busy_seconds.labels("0").inc(max(stats.busy_s - busy, 0.0))
        self._other_ranks_busy(stats.rank_busy)
        self.finished.inc(stats.requests_finished - self._finished_seen)
        self._finished_seen = stats.requests_finished
        self._latencies.stats = stats
        self._rank_counters.reports = stats.rank_busy
        self._last = (now, stats.generated_tokens, stats.busy_s)
        return generate_latest(self.registry)

    def _other_ranks_busy(self, reports: dict[int, BusyReport]) -> None:
        """Ranks > 0 from their reports: unchanged when none came since the last scrape."""
        for rank, report in sorted(reports.items()):
            if rank == 0:
                continue
            previous = self._reports_seen.get(rank)
            if previous is not None and report.now <= previous.now:
                continue
            fraction = busy_fraction(previous, report)
            if fraction is None:
                continue
            label = str(rank)
            self.busy.labels(label).set(fraction)
            self.busy_seconds.labels(label).inc(
                max(report.busy_s - (previous.busy_s if previous else 0.0), 0.0)
            )
            self._reports_seen[rank] = report


class _LatencyCollector:
    """The engine's latency histograms as Prometheus histograms (rendered as they are: the
    engine keeps the counts)."""

    def __init__(self) -> None:
        self.stats = ServingStats()

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        for name, documentation, latency in (
            ("ppruntime_time_to_first_token_seconds", "time to first token", self.stats.ttft),
            ("ppruntime_inter_token_latency_seconds", "time between tokens", self.stats.itl),
        ):
            yield HistogramMetricFamily(
                name, documentation, buckets=latency.cumulative(), sum_value=latency.sum_s
            )


class _RankCounterCollector:
    """Every rank's counters (engine/rank_stats.py COUNTERS) as last reported to rank 0:
    cumulative since that rank started, so rendered as they are. Ranks > 0 report about
    once a second; `ppruntime_rank_report_time_seconds` says when (the rank's monotonic
    clock: on one host, the same clock as any other process's `time.monotonic()`)."""

    def __init__(self) -> None:
        self.reports: dict[int, BusyReport] = {}

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        plain = {
            "iterations": ("ppruntime_rank_iterations", "executor iterations"),
            "batches": ("ppruntime_rank_microbatches", "microbatches computed"),
            "seqs": (
                "ppruntime_rank_microbatch_sequences",
                "sequences in the microbatches (over those: how full they were)",
            ),
            "decode_batches": (
                "ppruntime_rank_decode_microbatches",
                "microbatches of one new token a sequence",
            ),
            "decode_seqs": (
                "ppruntime_rank_decode_sequences",
                "sequences in decode microbatches (over those: how full they were)",
            ),
            "tokens_computed": ("ppruntime_rank_tokens_computed", "tokens through the stage"),
            "empty_iterations": (
                "ppruntime_rank_empty_iterations",
                "iterations that computed no microbatch",
            ),
            "idle_waits": ("ppruntime_rank_idle_waits", "steps with nothing to do (rank 0)"),
            "poll_sleeps": ("ppruntime_rank_poll_sleeps", "sleeps of polled waits"),
            "background_sleeps": (
                "ppruntime_rank_background_sleeps",
                "slow sleeps of the relay thread's polls while nobody waits for it",
            ),
            "voluntary_switches": (
                "ppruntime_rank_voluntary_context_switches",
                "the executor thread's voluntary context switches (Linux)",
            ),
            "involuntary_switches": (
                "ppruntime_rank_involuntary_context_switches",
                "the executor thread's involuntary context switches: another process took "
                "its core (Linux)",
            ),
        }
        reports = sorted((rank, report) for rank, report in self.reports.items() if report.counters)
        families = {
            key: CounterMetricFamily(name, text, labels=["rank"])
            for key, (name, text) in plain.items()
        }
        cpu = CounterMetricFamily(
            "ppruntime_rank_cpu_seconds",
            'CPU seconds of a rank: part="process" (every thread), "thread" (the executor\'s),'
            " or an executor span",
            labels=["rank", "part"],
        )
        when = GaugeMetricFamily(
            "ppruntime_rank_report_time_seconds",
            "when the rank took these counters (its time.monotonic())",
            labels=["rank"],
        )
        for rank, report in reports:
            label = str(rank)
            counters = report.counters
            for key, family in families.items():
                family.add_metric([label], counters.get(key, 0.0))
            cpu.add_metric([label, "process"], counters.get("process_cpu_s", 0.0))
            cpu.add_metric([label, "thread"], counters.get("thread_cpu_s", 0.0))
            for key, seconds in counters.items():
                if key.startswith("cpu:"):
                    cpu.add_metric([label, key[4:]], seconds)
            when.add_metric([label], report.now)
        yield from families.values()
        yield cpu
        yield when
