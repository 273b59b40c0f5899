"""scripts/bench_pp_gpus.py (issue 15): its CPU dry run end to end, and its pure parts.

The dry run (`--device cpu --small`, PP=1 and PP=2 over the host channel) checks what
the multi-GPU run will report: every figure present and in range, the efficiency
being the ratio of the two runs' throughputs, the busy fractions coming from the
trace's device spans, the timeline drawn. Its timings are not checked (a loaded CPU).
The pure parts: the 70B layer cut for an H200, the refusals of what cannot run
(nccl between ranks sharing one GPU), the busy-time arithmetic on made-up spans.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
from launching import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_pp_gpus as bench  # noqa: E402  (a script beside the others, not a package)
from _bench_models import SHAPES  # noqa: E402

TIMEOUT_S = 240
H200_BYTES = 150_000_000_000  # torch's total_memory of an H200: 139.7 GiB


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The driver in this process (it starts its MPI jobs as a user's would)."""
    out = tmp_path_factory.mktemp("pp-gpus")
    args = ["--device", "cpu", "--small", "--shapes", "8b", "--pp", "1,2", "--channels", "host"]
    args += ["--workdir", str(out), "--out", str(out / "pp.json"), "--png", str(out / "pp.png")]
    args += ["--run-timeout", str(TIMEOUT_S)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(args) == 0
    return json.loads((out / "pp.json").read_text()), printed.getvalue(), out


def test_dry_run_reports_every_figure_in_range(dry_run):
    report, _, _ = dry_run
    runs = {run["label"]: run for run in report["runs"]}
    assert sorted(runs) == ["small-pp1--", "small-pp2-host"]
    pp1, pp2 = runs["small-pp1--"], runs["small-pp2-host"]
    for run in (pp1, pp2):
        for key in ("output_tokens_per_s", "window_s", "ttft_p50_s", "tpot_p50_s"):
            assert math.isfinite(run[key]) and run[key] > 0, (key, run)
        assert run["output_tokens"] == 8 * 8  # every request generated all its tokens
        assert run["ttft_p50_s"] <= run["ttft_p99_s"]
        assert len(run["ranks"]) == run["pp"]
        assert sum(rank["layers"] for rank in run["ranks"]) == SHAPES["small"].num_hidden_layers
        for rank in run["ranks"]:
            assert 0 < rank["busy_fraction"] <= 1, rank
            assert rank["busy_fraction"] + rank["bubble_fraction"] == pytest.approx(1, abs=1e-3)
            assert rank["decode_steps"] > 0 and rank["decode_step_s"] > 0, rank
            assert 0 < rank["roofline_fraction"] <= 1.5, rank
            assert rank["roofline_s"] == pytest.approx(
                (rank["weight_bytes"] + rank["kv_bytes"]) / run["copy_bandwidth_bytes_per_s"],
                rel=1e-3,
            )
    assert pp1["efficiency"] == pytest.approx(1.0)
    assert 0 < pp2["efficiency"] <= 1.5
    assert pp2["efficiency"] == pytest.approx(
        pp2["output_tokens_per_s"] / (2 * pp1["output_tokens_per_s"]), rel=1e-3
    )
    assert "not run" in report["targets"]["efficiency_pp4"]


def test_dry_run_busy_fraction_is_the_traces_device_time(dry_run):
    report, _, _ = dry_run
    run = next(run for run in report["runs"] if run["pp"] == 2)
    spans = bench.read_trace(bench.Path(run["trace"]))
    assert set(spans) == {0, 1}
    lo = run["trace_window_start"]
    hi = lo + run["window_s"]
    for rank in run["ranks"]:
        device = [
            (s["start"], s["end"]) for s in spans[rank["rank"]] if s["name"] in bench.DEVICE_SPANS
        ]
        busy = bench.union_within(device, lo, hi) / (hi - lo)
        assert rank["busy_fraction"] == pytest.approx(busy, abs=1e-3)


def test_dry_run_draws_the_largest_pp_run_and_prints_the_table(dry_run):
    report, stdout, out = dry_run
    assert report["png"] == [str(out / "pp.png"), str(out / "pp-zoom.png")]
    for png in report["png"]:
        assert bench.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run "))
    assert lines[header + 1].startswith("small-pp1--") and lines[header + 2].startswith("small-pp2")


def test_70b_cut_overflows_one_h200_and_fits_two():
    machine = bench.Machine("cuda", 2, H200_BYTES, "H200")
    load = bench.Load(256, 512, 256, 256, 8192, 16)
    cut = bench.cut_layers(SHAPES["70b"], machine, load, 2)
    assert not cut["fits_one_device"]
    assert cut["weights_and_kv_bytes"] > bench.OVERFLOW * H200_BYTES
    assert cut["largest_stage_bytes_pp2"] < bench.STAGE_FILL * H200_BYTES
    # the fewest such layers: one fewer would not overflow by the factor
    fewer = cut["weights_and_kv_bytes"] - cut["bytes_per_layer_with_kv"]
    assert fewer <= bench.OVERFLOW * H200_BYTES
    assert 2 <= cut["layers"] < 80


def test_nccl_between_ranks_sharing_a_gpu_is_refused():
    one_gpu = bench.Machine("cuda", 1, H200_BYTES, "H200")
    with pytest.raises(SystemExit, match="NCCL refuses two ranks on one GPU"):
        bench.check_channels(["nccl"], one_gpu, [1, 2])
    bench.check_channels(["host"], one_gpu, [1, 2])  # ranks sharing the GPU: fine
    with pytest.raises(SystemExit, match="--channels host"):
        bench.main(["--gpus", "1", "--channels", "nccl"])
    with pytest.raises(SystemExit, match="on the CPU"):
        bench.check_channels(["nccl"], bench.Machine("cpu", 2, 0, "cpu"), [1, 2])


def test_busy_time_is_the_union_inside_the_window():
    assert bench.union_within([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert bench.union_within([(0, 2), (1, 3), (5, 6)], 2.5, 5.5) == 1
    spans = [
        {"name": "device-decode", "start": 1.0, "end": 2.0, "args": {"context_tokens": 10}},
        {"name": "device-decode", "start": 3.0, "end": 3.5, "args": {"context_tokens": 20}},
        {"name": "device-prefill", "start": 0.0, "end": 1.0, "args": {}},
        {"name": "forward", "start": 1.0, "end": 1.1, "args": {}},
    ]
    figures = bench.rank_figures(spans, 0.5, 4.5)
    assert figures["busy_fraction"] == pytest.approx(2.0 / 4.0)
    assert figures["decode_steps"] == 2 and figures["decode_step_s"] == pytest.approx(0.75)
    assert figures["decode_context_tokens_mean"] == 15
    assert figures["host_compute_fraction"] == pytest.approx(0.1 / 4.0)


def test_a_failing_run_is_named_and_the_driver_exits_1(tmp_path, monkeypatch):
    """PPRUNTIME_FAULT makes rank 1 raise in its first forward: the job ends, the run is
    named in the JSON's 'failed' with its output, the driver goes on and exits 1."""
    monkeypatch.setenv("PPRUNTIME_FAULT", "1:0")
    args = ["--device", "cpu", "--small", "--shapes", "8b", "--pp", "2", "--channels", "host"]
    args += ["--workdir", str(tmp_path), "--out", str(tmp_path / "pp.json")]
    args += ["--run-timeout", str(TIMEOUT_S)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(args) == 1
    report = json.loads((tmp_path / "pp.json").read_text())
    assert report["complete"] and report["runs"] == []
    [failure] = report["failed"]
    assert failure["label"] == "small-pp2-host"
    assert "InjectedFault" in failure["error"], failure["error"]
    assert "small-pp2-host: FAILED" in printed.getvalue()
