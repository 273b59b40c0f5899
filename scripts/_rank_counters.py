"""Per-rank counters (ppruntime/engine/rank_stats.py COUNTERS) for bench_serve.py: taken
from a live offline job (`LLM.engine_state()`) or a server's `GET /metrics`, fresh after a
given moment, then differenced over a phase and put side by side, path against path.

Ranks > 0 report to rank 0 about once a second, so a snapshot that must cover a phase
waits until every rank's report was taken after the phase ended (up to ~2 s). While it
waits the job is idle: rank 1's header wait polls (its "receive-wait" span and
`poll_sleeps` grow a little, the same on both paths), nothing else moves.
"""

from __future__ import annotations

import time
import urllib.request

FRESH_TIMEOUT_S = 15.0

# /metrics family (without _total) -> counter name
_METRIC_COUNTERS = {
    "ppruntime_rank_iterations": "iterations",
    "ppruntime_rank_microbatches": "batches",
    "ppruntime_rank_microbatch_sequences": "seqs",
    "ppruntime_rank_decode_microbatches": "decode_batches",
    "ppruntime_rank_decode_sequences": "decode_seqs",
    "ppruntime_rank_tokens_computed": "tokens_computed",
    "ppruntime_rank_empty_iterations": "empty_iterations",
    "ppruntime_rank_idle_waits": "idle_waits",
    "ppruntime_rank_poll_sleeps": "poll_sleeps",
    "ppruntime_rank_background_sleeps": "background_sleeps",
    "ppruntime_rank_voluntary_context_switches": "voluntary_switches",
    "ppruntime_rank_involuntary_context_switches": "involuntary_switches",
}
# spans shown in the table, in the order of an iteration (the rest: "other spans")
TABLE_SPANS = (
    "receive-wait",
    "relay-wait",
    "handle",
    "schedule",
    "forward",
    "sample",
    "relay",
    "send",
    "send-wait",
    "idle",
    "outputs",
    "link-in",
    "deltas-out",
)


def offline_snapshot(llm, after: float, pp: int) -> dict[int, dict]:
    """Every rank's counters as reported after `after` (time.monotonic()), from rank 0."""
    deadline = time.monotonic() + FRESH_TIMEOUT_S
    while True:
        reports = llm.engine_state()["rank_busy"]
        fresh = {rank: r for rank, r in reports.items() if r.now >= after and r.counters}
        if len(fresh) == pp or time.monotonic() > deadline:
            return {rank: dict(report.counters) for rank, report in fresh.items()}
        time.sleep(0.05)


def parse_metrics(text: str) -> dict[int, dict]:
    """{rank: counters} from a /metrics page, with each rank's report time ("now")."""
    from prometheus_client.parser import text_string_to_metric_families

    ranks: dict[int, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "rank" not in sample.labels:
                continue
            rank = ranks.setdefault(int(sample.labels["rank"]), {})
            name = sample.name.removesuffix("_total")
            if name in _METRIC_COUNTERS:
                rank[_METRIC_COUNTERS[name]] = sample.value
            elif name == "ppruntime_rank_cpu_seconds":
                part = sample.labels["part"]
                key = {"process": "process_cpu_s", "thread": "thread_cpu_s"}.get(part)
                rank[key or f"cpu:{part}"] = sample.value
            elif name == "ppruntime_rank_report_time_seconds":
                rank["now"] = sample.value
    return {rank: counters for rank, counters in ranks.items() if "now" in counters}


def server_snapshot(url: str, after: float, pp: int) -> dict[int, dict]:
    """The server's per-rank counters, every rank's report taken after `after`."""
    deadline = time.monotonic() + FRESH_TIMEOUT_S
    while True:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            ranks = parse_metrics(response.read().decode())
        if not ranks:
            return {}  # a server without per-rank counters (an older tree, --variant-tree)
        fresh = {rank: c for rank, c in ranks.items() if c["now"] >= after}
        if len(fresh) == pp or time.monotonic() > deadline:
            return fresh
        time.sleep(0.1)


def difference(before: dict[int, dict], after: dict[int, dict]) -> dict[int, dict]:
    """What each rank's counters grew by between two snapshots."""
    return {
        rank: {
            key: value - before.get(rank, {}).get(key, 0.0)
            for key, value in counters.items()
            if key != "now"
        }
        for rank, counters in after.items()
    }


def add(total: dict[int, dict], more: dict[int, dict]) -> dict[int, dict]:
    for rank, counters in more.items():
        into = total.setdefault(rank, {})
        for key, value in counters.items():
            into[key] = into.get(key, 0.0) + value
    return total


def summarize(counters: dict[int, dict], tokens: int) -> dict[str, dict]:
    """A path's per-rank figures over `tokens` output tokens: counts per 1000 tokens, how
    full its decode microbatches were, CPU a token (us) and an iteration by span."""
    figures = {}
    for rank, c in sorted(counters.items()):
        iterations = c.get("iterations", 0.0)
        thread = c.get("thread_cpu_s", 0.0)
        spans = {key[4:]: value for key, value in c.items() if key.startswith("cpu:")}
        shown = {span: spans.get(span, 0.0) for span in TABLE_SPANS}
        shown["other spans"] = sum(spans.values()) - sum(shown.values())
        shown["outside spans"] = thread - sum(spans.values())  # the caller's loop, rank 0
        per_token = {span: seconds / tokens * 1e6 for span, seconds in shown.items()}
        per_token["thread"] = thread / tokens * 1e6
        per_token["other threads"] = (c.get("process_cpu_s", 0.0) - thread) / tokens * 1e6
        decode = c.get("decode_batches", 0.0)
        batches = c.get("batches", 0.0)
        figures[f"rank {rank}"] = {
            "iterations_per_1k_tokens": iterations / tokens * 1e3,
            "microbatches_per_1k_tokens": c.get("batches", 0.0) / tokens * 1e3,
            "empty_iterations_per_1k_tokens": c.get("empty_iterations", 0.0) / tokens * 1e3,
            "idle_waits_per_1k_tokens": c.get("idle_waits", 0.0) / tokens * 1e3,
            "poll_sleeps_per_1k_tokens": c.get("poll_sleeps", 0.0) / tokens * 1e3,
            "background_sleeps_per_1k_tokens": c.get("background_sleeps", 0.0) / tokens * 1e3,
            "involuntary_switches_per_iteration": (
                c.get("involuntary_switches", 0.0) / iterations if iterations else None
            ),
            "voluntary_switches_per_iteration": (
                c.get("voluntary_switches", 0.0) / iterations if iterations else None
            ),
            "forward_cpu_us_per_microbatch": (
                c.get("cpu:forward", 0.0) / c["batches"] * 1e6 if c.get("batches") else None
            ),
            "seqs_per_microbatch": c.get("seqs", 0.0) / batches if batches else None,
            "seqs_per_decode_microbatch": c.get("decode_seqs", 0.0) / decode if decode else None,
            "decode_share_of_microbatches": decode / batches if batches else None,
            "thread_cpu_us_per_iteration": thread / iterations * 1e6 if iterations else None,
            "cpu_us_per_token": per_token,
        }
    return figures


def table(paths: dict[str, dict]) -> list[str]:
    """Markdown lines: one column per (path, rank), one row per figure."""
    columns = [(path, rank) for path, ranks in paths.items() for rank in ranks]
    if not columns:
        return []
    lines = [
        "| per rank | " + " | ".join(f"{path} {rank}" for path, rank in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]

    def row(label: str, pick) -> None:
        values = [pick(paths[path][rank]) for path, rank in columns]
        cells = [
            "-" if value is None else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
            for value in values
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for key, label in (
        ("iterations_per_1k_tokens", "iterations / 1k tokens"),
        ("microbatches_per_1k_tokens", "microbatches / 1k tokens"),
        ("empty_iterations_per_1k_tokens", "empty iterations / 1k tokens"),
        ("idle_waits_per_1k_tokens", "idle waits / 1k tokens"),
        ("poll_sleeps_per_1k_tokens", "poll sleeps / 1k tokens"),
        ("background_sleeps_per_1k_tokens", "relay thread's slow sleeps / 1k tokens"),
        ("involuntary_switches_per_iteration", "involuntary context switches / iteration"),
        ("voluntary_switches_per_iteration", "voluntary context switches / iteration"),
        ("forward_cpu_us_per_microbatch", "forward CPU us / microbatch"),
        ("seqs_per_microbatch", "sequences a microbatch"),
        ("seqs_per_decode_microbatch", "sequences a decode microbatch"),
        ("decode_share_of_microbatches", "decode microbatches / all"),
        ("thread_cpu_us_per_iteration", "executor thread CPU us / iteration"),
    ):
        row(label, lambda figures, key=key: figures[key])
    first = paths[columns[0][0]][columns[0][1]]["cpu_us_per_token"]
    for part in first:
        row(f"CPU us / token: {part}", lambda figures, part=part: figures["cpu_us_per_token"][part])
    return lines
