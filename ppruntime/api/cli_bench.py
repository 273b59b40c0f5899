"""`ppruntime bench`: the pipeline benchmark (scripts/bench_pipeline.py).

Run it without mpirun: it starts its own MPI jobs (PP=1 and PP=N back to back for
`--compare N`, async and deterministic for `--uneven`). It needs the source
checkout, where the benchmark scripts live.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_pipeline.py"


def _load_bench_module():
    if not SCRIPT.is_file():
        raise SystemExit(f"ppruntime bench needs the source checkout: {SCRIPT} not found")
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_bench_parser(sub, add_common) -> None:
    parser = sub.add_parser(
        "bench",
        help="pipeline benchmark: throughput, TTFT/TPOT, bubbles (--compare N, --uneven)",
    )
    if SCRIPT.is_file():
        _load_bench_module().add_arguments(parser)
    add_common(parser)
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    return _load_bench_module().drive(args)
