"""scripts/bench_gpu_ab.py: the A/B driver's order, its comparison, and which tree a run
imports (the benchmark runs themselves are bench_gpu.py's, tested in test_benchmarks.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import bench_gpu_ab as ab  # noqa: E402  (a script beside the others, not a package)


def fake_result(step_ms: float) -> dict:
    return {
        "cases": {
            "8b-decode": {"decode_step_ms": step_ms, "decode_roofline_fraction": 4.0 / step_ms}
        }
    }


def test_each_tree_goes_first_as_often():
    assert ab.run_order(1) == ["this", "base"]
    assert ab.run_order(3) == ["this", "base", "base", "this", "this", "base"]


def test_compare_takes_each_trees_median():
    runs = [("this", fake_result(5.0)), ("base", fake_result(6.0)), ("base", fake_result(5.5))]
    runs += [("this", fake_result(5.2)), ("this", fake_result(9.0)), ("base", fake_result(6.5))]
    row = ab.compare(runs)["8b-decode"]
    assert [run["decode_step_ms"] for run in row["this"]] == [5.0, 5.2, 9.0]
    assert row["median_step_ms"] == {"this": 5.2, "base": 6.0}
    assert row["this_over_base"] == pytest.approx(5.2 / 6.0)


def test_a_run_imports_the_named_trees_package(tmp_path):
    shutil.copytree(REPO_ROOT / "ppruntime", tmp_path / "ppruntime", dirs_exist_ok=True)
    assert ab.imported_package(tmp_path) == tmp_path.resolve() / "ppruntime"
    assert ab.imported_package(REPO_ROOT) == REPO_ROOT / "ppruntime"


def test_main_alternates_the_trees_and_writes_the_ratio(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    shutil.copytree(REPO_ROOT / "ppruntime", base / "ppruntime")
    calls = []

    def fake_run(tree, command):
        calls.append((tree, command))
        return fake_result(5.0 if tree == ab.THIS_TREE else 6.0)

    monkeypatch.setattr(ab, "run_bench", fake_run)
    out = tmp_path / "ab.json"
    assert ab.main(["--baseline", str(base), "--rounds", "2", "--out", str(out), "--", "--x"]) == 0
    assert [tree for tree, _ in calls] == [
        ab.THIS_TREE,
        base.resolve(),
        base.resolve(),
        ab.THIS_TREE,
    ]
    command = calls[0][1]
    assert command[1] == str(REPO_ROOT / "scripts" / "bench_gpu.py")  # this tree's script for both
    assert command[-1] == "--x" and "--no-transformers" in command
    assert command[command.index("--cases") + 1] == "1b-decode,8b-decode"
    report = json.loads(out.read_text())
    assert report["cases"]["8b-decode"]["this_over_base"] == pytest.approx(5.0 / 6.0)
    assert len(report["runs"]) == 4 and report["complete"] is True
    printed = capsys.readouterr().out
    assert "this / base (median step): 0.833" in printed
    assert "run 2: base" in printed and "8b-decode 6.000 ms" in printed  # each run as it ends


def test_the_report_is_written_after_every_run(tmp_path, monkeypatch):
    """A device call's time limit may kill the job between runs: what ran is kept."""
    base = tmp_path / "base"
    shutil.copytree(REPO_ROOT / "ppruntime", base / "ppruntime")
    out = tmp_path / "ab.json"
    seen = []

    def fake_run(tree, command):
        if len(seen) == 3:
            raise KeyboardInterrupt  # the fourth run never ends
        if out.exists():
            seen.append(len(json.loads(out.read_text())["runs"]))
        else:
            seen.append(0)
        return fake_result(5.0 if tree == ab.THIS_TREE else 6.0)

    monkeypatch.setattr(ab, "run_bench", fake_run)
    with pytest.raises(KeyboardInterrupt):
        ab.main(["--baseline", str(base), "--rounds", "2", "--out", str(out)])
    assert seen == [0, 1, 2]
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 3 and report["complete"] is False
    assert not list(tmp_path.glob("*.tmp"))
    row = report["cases"]["8b-decode"]
    assert row["median_step_ms"] == {"this": 5.0, "base": 6.0}
    assert row["this_over_base"] == pytest.approx(5.0 / 6.0)


def test_a_baseline_without_the_package_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ab.main(["--baseline", str(tmp_path)])
    assert "holds no ppruntime package" in capsys.readouterr().err
