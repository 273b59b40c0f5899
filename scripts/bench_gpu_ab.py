#!/usr/bin/env python
"""This tree's decode step against another tree's, side by side on one GPU.

    git archive COMMIT ppruntime | tar -x -C /tmp/base        # the baseline's package
    python scripts/bench_gpu_ab.py --baseline /tmp/base --out ab.json
    python scripts/bench_gpu_ab.py --baseline /tmp/base --small --device cpu   # the flow

Runs this tree's `scripts/bench_gpu.py` (default cases 1b-decode,8b-decode, no
transformers, no attention micro-benchmark) `--rounds` times for each tree, alternating
which goes first (this, base, base, this, ...), each run its own process with PYTHONPATH
naming the tree whose `ppruntime` it imports; the benchmark script itself is this tree's
for both, so the two measure the same workload. Prints each case's decode step and
roofline fraction per run, and this tree's median step over the baseline's: on one
machine minutes apart, so drift between runs shows in the spread of the rounds, not in
the ratio of one pair. Arguments after `--` go to bench_gpu.py as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
THIS_TREE = SCRIPTS.parent


def bench_command(args: argparse.Namespace, out: Path) -> list[str]:
    command = [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--out", str(out)]
    command += ["--small"] if args.small else ["--cases", args.cases]
    command += ["--no-transformers", "--no-attention"]
    if args.device:
        command += ["--device", args.device]
    return command + args.bench_args


def tree_env(tree: Path) -> dict[str, str]:
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])
    )


def imported_package(tree: Path) -> Path:
    """Where a process started as the benchmark is imports ppruntime from (an installed
    copy, or the current directory, must not stand in for the tree)."""
    probe = [sys.executable, "-c", "import ppruntime; print(ppruntime.__file__)"]
    where = subprocess.run(
        probe, env=tree_env(tree), cwd=SCRIPTS, capture_output=True, text=True, check=True
    )
    return Path(where.stdout.strip()).resolve().parent


def run_bench(tree: Path, command: list[str]) -> dict:
    """One bench_gpu.py run importing `tree`'s ppruntime: its JSON result."""
    env = tree_env(tree)
    out = Path(command[command.index("--out") + 1])
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(
            f"bench_gpu.py on {tree} exited {completed.returncode}:\n{completed.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def run_order(rounds: int) -> list[str]:
    """this, base, base, this, this, base, ...: each tree first as often."""
    order = []
    for round_index in range(rounds):
        pair = ["this", "base"] if round_index % 2 == 0 else ["base", "this"]
        order += pair
    return order


def compare(runs: list[tuple[str, dict]]) -> dict:
    """Per case: each tree's decode steps and roofline fractions, and the medians' ratio."""
    cases: dict[str, dict] = {}
    for tree, result in runs:
        for name, case in result["cases"].items():
            row = cases.setdefault(name, {"this": [], "base": []})
            row[tree].append(
                {
                    "decode_step_ms": case["decode_step_ms"],
                    "roofline_fraction": case["decode_roofline_fraction"],
                }
            )
    for row in cases.values():
        medians = {
            tree: statistics.median(run["decode_step_ms"] for run in row[tree])
            for tree in ("this", "base")
            if row[tree]
        }
        row["median_step_ms"] = medians
        if len(medians) == 2:  # a report written before both trees have run has no ratio
            row["this_over_base"] = medians["this"] / medians["base"]
    return cases


def run_summary(result: dict) -> str:
    return ", ".join(
        f"{name} {case['decode_step_ms']:.3f} ms ({case['decode_roofline_fraction']:.1%})"
        for name, case in result["cases"].items()
    )


def write_report(out: Path, baseline: Path, rounds: int, runs: list[tuple[str, dict]]) -> None:
    """The report so far, replacing the last one whole (a kill mid-write leaves the old)."""
    report = {"baseline": str(baseline), "rounds": rounds, "cases": compare(runs)}
    report["complete"] = len(runs) == 2 * rounds  # a partial report's ratio rests on fewer runs
    report["runs"] = [{"tree": tree, "result": result} for tree, result in runs]
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(json.dumps(report, indent=1, default=float) + "\n")
    os.replace(partial, out)


def print_comparison(cases: dict) -> None:
    for name, row in cases.items():
        for tree in ("this", "base"):
            steps = ", ".join(
                f"{run['decode_step_ms']:.3f} ms ({run['roofline_fraction']:.1%})"
                for run in row[tree]
            )
            print(f"{name:<12} {tree}: {steps}")
        print(
            f"{name:<12} this / base (median step): {row['this_over_base']:.3f} "
            f"({row['median_step_ms']['this']:.3f} / {row['median_step_ms']['base']:.3f} ms)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="a tree holding a ppruntime package")
    parser.add_argument("--cases", default="1b-decode,8b-decode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="bench_gpu's tiny case")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.bench_args = bench_args
    baseline = Path(args.baseline).resolve()
    if not (baseline / "ppruntime" / "__init__.py").is_file():
        parser.error(f"--baseline {baseline} holds no ppruntime package")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    trees = {"this": THIS_TREE, "base": baseline}
    for name, tree in trees.items():
        found = imported_package(tree)
        if found != tree / "ppruntime":
            parser.error(f"the {name} tree's runs would import ppruntime from {found}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-ab-") as tmp:
        for index, tree in enumerate(run_order(args.rounds)):
            command = bench_command(args, Path(tmp) / f"run{index}.json")
            result = run_bench(trees[tree], command)
            runs.append((tree, result))
            print(f"run {index + 1}: {tree} ({trees[tree]}): {run_summary(result)}", flush=True)
            if args.out:  # after every run: a run cut short by a time limit keeps what ran
                write_report(Path(args.out), baseline, args.rounds, runs)
    print_comparison(compare(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
