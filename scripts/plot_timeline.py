#!/usr/bin/env python
"""Draw a ppruntime Chrome trace as a Gantt chart per rank (issue 6).

    python scripts/plot_timeline.py trace.json -o timeline.png [--start-ms A --end-ms B]

The trace comes from `LLM(trace=...)`, `ppruntime generate --trace FILE` or
`scripts/bench_pipeline.py --trace FILE`. One row per rank; forward (and sample)
bars are colored by microbatch, so a microbatch can be followed down the pipeline;
send, receive-wait, relay, handle, schedule and idle are drawn as thin grey/colored
bars under them, and the white gaps are the bubbles. A thin lane above the bars shows
when the device computed each microbatch (device-decode / device-prefill: on CUDA
the GPU's own timestamps, as the host spans there only launch the work).
"""

from __future__ import annotations

import argparse
import json
import sys

COMPUTE = ("forward", "sample")
OTHER_COLORS = {
    "send": "#4c72b0",
    "send-wait": "#8c8c8c",
    "receive-wait": "#c0c0c0",
    "relay": "#dd8452",
    "handle": "#55a868",
    "schedule": "#8172b3",
    "idle": "#e0e0e0",
}
# when the device computed (ppruntime/stage/device_spans.py): a lane above the bars
DEVICE_COLORS = {"device-decode": "#2ca02c", "device-prefill": "#d62728"}


def load(path: str) -> dict[int, list[tuple[str, float, float, int]]]:
    with open(path) as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    spans = [e for e in events if e.get("ph") == "X"]
    if not spans:
        raise SystemExit(f"{path}: no spans in this trace")
    origin = min(e["ts"] for e in spans)
    per_rank: dict[int, list] = {}
    for e in spans:
        start = (e["ts"] - origin) / 1000.0
        per_rank.setdefault(int(e["tid"]), []).append(
            (
                e["name"],
                start,
                start + e["dur"] / 1000.0,
                int(e.get("args", {}).get("microbatch", -1)),
            )
        )
    return per_rank


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="Chrome trace JSON written by ppruntime")
    parser.add_argument("-o", "--output", default="timeline.png")
    parser.add_argument("--start-ms", type=float, default=None, help="window start (ms)")
    parser.add_argument("--end-ms", type=float, default=None, help="window end (ms)")
    parser.add_argument("--width", type=float, default=16.0, help="figure width (inches)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    per_rank = load(args.trace)
    ranks = sorted(per_rank)
    end_all = max(end for spans in per_rank.values() for _, _, end, _ in spans)
    lo = args.start_ms if args.start_ms is not None else 0.0
    hi = args.end_ms if args.end_ms is not None else end_all
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(args.width, 1.2 + 0.9 * len(ranks)))
    for row, rank in enumerate(ranks):
        y = len(ranks) - 1 - row
        for name, start, end, microbatch in per_rank[rank]:
            if end < lo or start > hi:
                continue
            if name in COMPUTE:
                color = cmap(microbatch % 20) if microbatch >= 0 else "black"
                hatch = "//" if name == "sample" else None
                ax.broken_barh(
                    [(start, end - start)],
                    (y - 0.35, 0.55),
                    facecolors=color,
                    edgecolor="black" if hatch else None,
                    linewidth=0.2,
                    hatch=hatch,
                )
            elif name in DEVICE_COLORS:
                ax.broken_barh(
                    [(start, end - start)], (y + 0.22, 0.1), facecolors=DEVICE_COLORS[name]
                )
            else:
                ax.broken_barh(
                    [(start, end - start)],
                    (y - 0.45, 0.08),
                    facecolors=OTHER_COLORS.get(name, "#999999"),
                )
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.7, len(ranks) - 0.3)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"rank {rank}" for rank in reversed(ranks)])
    ax.set_xlabel("time (ms)")
    ax.set_title("ppruntime pipeline timeline: forward colored by microbatch, gaps are bubbles")
    legend = [
        Patch(facecolor=cmap(0), label="forward (color = microbatch)"),
        Patch(facecolor="white", edgecolor="black", hatch="//", label="sample"),
    ]
    legend += [Patch(facecolor=color, label=name) for name, color in OTHER_COLORS.items()]
    legend += [Patch(facecolor=color, label=name) for name, color in DEVICE_COLORS.items()]
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18 - 0.05 * len(ranks)),
        ncol=5,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output} ({len(ranks)} ranks, {lo:.1f}-{hi:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
