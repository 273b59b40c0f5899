"""The benchmark scripts, run as a user runs them but with small workloads.

What they measure is a timing and is not checked here (that belongs to the scripts'
own side-by-side ratios, docs/benchmarks.md). Checked: each script runs its MPI jobs
to the end and prints the keys issue 6 names; the counters that are properties of
the code, not of the machine (no allocation per decode step, block-table writes
only at page boundaries, no per-token Python objects in the ingest path) hold; the
`--trace` timeline merges every rank; plot_timeline draws it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from launching import REPO_ROOT, describe, mpi_env, run_mpi, wait_mpi

TIMEOUT_S = 180
SCRIPTS = REPO_ROOT / "scripts"
SMALL_PIPELINE = ["--preset", "tiny", "--num-requests", "4", "--input-len", "8"]
SMALL_PIPELINE += ["--output-len", "8"]


def _run(args: list[str]) -> dict:
    """Run a benchmark driver (it starts its own mpirun jobs); its last line as JSON."""
    proc = subprocess.Popen(
        [*args, "--json"],
        cwd=str(REPO_ROOT),
        env=mpi_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    result = wait_mpi(proc, TIMEOUT_S)  # kills the driver and its jobs on a timeout
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _positive_numbers(result: dict, keys: list[str]) -> None:
    for key in keys:
        assert key in result, f"{key} missing from {sorted(result)}"
        assert isinstance(result[key], (int, float)), (key, result[key])
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])


def _spans(trace_path: Path) -> dict[int, set[str]]:
    trace = json.loads(trace_path.read_text())
    names: dict[int, set[str]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            assert event["dur"] >= 0 and event["ts"] >= 0, event
            names.setdefault(event["tid"], set()).add(event["name"])
    return names


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """`ppruntime bench --compare 2 --trace FILE` (the CLI entry of bench_pipeline)."""
    trace = tmp_path_factory.mktemp("bench") / "compare.json"
    args = [sys.executable, "-m", "ppruntime", "bench", *SMALL_PIPELINE, "--compare", "2"]
    return _run([*args, "--trace", str(trace)]), trace


def test_bench_compare_reports_efficiency_and_per_rank_fractions(compare_run):
    result, _ = compare_run
    _positive_numbers(result, ["efficiency", "output_tokens_per_s", "requests_per_s"])
    pp1, pp2 = result["pp1"], result["pp2"]
    assert result["efficiency"] == pytest.approx(
        pp2["output_tokens_per_s"] / (2 * pp1["output_tokens_per_s"]), rel=1e-3
    )
    for run, ranks in ((pp1, 1), (pp2, 2)):
        assert len(run["busy_fraction"]) == ranks and len(run["bubble_fraction"]) == ranks
        for busy, bubble in zip(run["busy_fraction"], run["bubble_fraction"]):
            assert 0 < busy <= 1 and busy + bubble == pytest.approx(1, abs=1e-3)
        assert 0 < run["ttft_p50_s"] <= run["ttft_p99_s"]
        assert 0 < run["tpot_p50_s"] <= run["tpot_p99_s"]


def test_bench_trace_merges_every_rank_and_plots(compare_run, tmp_path):
    _, trace = compare_run
    spans = _spans(trace)
    assert set(spans) == {0, 1}
    assert {"forward", "send", "schedule", "handle"} <= spans[0]
    assert {"forward", "sample", "receive-wait", "relay"} <= spans[1]
    for rank in (0, 1):  # when the device computed (on the CPU: the forward's wall time)
        assert {"device-prefill", "device-decode"} <= spans[rank], spans[rank]
    png = tmp_path / "timeline.png"
    plot = subprocess.run(
        [sys.executable, str(SCRIPTS / "plot_timeline.py"), str(trace), "-o", str(png)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_uneven_reports_both_modes():
    result = _run([sys.executable, str(SCRIPTS / "bench_pipeline.py"), *SMALL_PIPELINE,
                   "--uneven", "--imbalance", "delay"])  # fmt: skip
    _positive_numbers(result, ["bound_ratio_async", "bound_ratio_sync"])
    for mode in ("async", "sync"):
        fast, slow = result[f"stage_s_per_microbatch_{mode}"]
        assert slow > fast, result  # the delay knob slowed the second stage


def test_bench_partitions_compares_default_auto_and_every_split():
    result = _run([sys.executable, str(SCRIPTS / "bench_pipeline.py"), *SMALL_PIPELINE,
                   "--partitions", "--partition-delay-ms", "100"])  # fmt: skip
    # tiny has 4 layers: three whole-layer splits at PP=2
    assert sorted(result["throughput_by_partition"]) == ["1,3", "2,2", "3,1"]
    assert result["best_partition"] in result["throughput_by_partition"]
    _positive_numbers(result, ["auto_over_best", "auto_over_default", "imbalance_default"])
    _positive_numbers(result, ["auto_predicted_over_measured_slowest", "imbalance_auto"])
    _positive_numbers(result, ["auto_reprobed_over_measured_slowest"])  # probed after the run
    assert len(result["auto_reprobed_stage_s"]) == 2
    assert result["delayed_predicted_best_over_default"] >= 1.0
    # a stage that sleeps 100 ms per forward keeps only the one layer it must hold (only
    # a layer costing more than that delay would make "2,2" the better split)
    assert result["delayed_auto_partition"] == "3,1"


def test_bench_stage_time_from_device_spans():
    """--device-time (the default on a GPU): a stage's time is its device spans' (on the
    CPU they are host time around the same calls: the path the GPU runs, on the CPU)."""
    result = _run([sys.executable, str(SCRIPTS / "bench_pipeline.py"), *SMALL_PIPELINE,
                   "--pp", "2", "--device", "cpu", "--device-time"])  # fmt: skip
    _positive_numbers(result, ["bound_ratio"])
    for rank in result["ranks"]:
        assert rank["compute_is_device_time"], rank
        assert rank["s_per_microbatch"] > 0 and rank["batches"] > 0, rank


def _bench_pipeline_module():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_pipeline
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_pipeline


def test_bench_partitions_span_keeps_the_splits_near_the_default():
    bench = _bench_pipeline_module()
    assert len(bench._splits(32, 2, (16, 16), None)) == 31
    near = bench._splits(32, 2, (16, 16), 3)
    assert near == [(13, 19), (14, 18), (15, 17), (16, 16), (17, 15), (18, 14), (19, 13)]
    assert bench._splits(6, 3, (2, 2, 2), 1) == [
        c for c in bench._compositions(6, 3) if all(1 <= n <= 3 for n in c)
    ]


def test_bench_partitions_arithmetic_of_the_cost_model():
    """The reachable ratios the bench prints come from the cost model: made-up costs."""
    bench = _bench_pipeline_module()
    fast = {"layer_s": 1.0, "embed_s": 0.0, "head_s": 1.5, "fixed_s": 0.0}
    slow = {**fast, "fixed_s": 3.0}  # a delayed rank: 3 per forward
    splits = bench._splits(8, 2, (4, 4), None)
    predicted = bench._predicted_slowest([fast, slow], splits)
    assert predicted["4,4"] == 8.5  # 4 layers + head + delay
    assert min(predicted, key=predicted.get) == "6,2"  # 6 against 2 + 1.5 + 3
    assert predicted["6,2"] == 6.5
    # split anywhere: 6.25 layers on rank 0 against 1.75 + 1.5 + 3 on rank 1
    assert math.isclose(bench._fractional_best_s([fast, slow], 8), 6.25)
    assert bench._fractional_best_s([fast, slow, fast], 8) is None


def test_bench_serve_reports_both_paths_and_the_ttft_phase():
    """The H200 flow on a tiny shape: the checkpoint written once and served (its lengths
    bound the engine), offline beside the 4-stream phase, then a 2-stream TTFT phase on
    the same server."""
    args = ["--shape", "small", "--device", "cpu", "--clients", "4", "--requests", "6"]
    args += ["--ttft-clients", "2", "--ttft-requests", "3", "--input-len", "8", "--output-len", "6"]
    args += ["--variant-flags", "--http-nice 5", "--variant-env", "PPRUNTIME_POLL_MAX_US=400"]
    result = _run([sys.executable, str(SCRIPTS / "bench_serve.py"), *args, "--rounds", "2"])
    # two rounds of the 6 requests through each path, the streams read by the lean client
    assert result["model"] == "small" and result["requests"] == 12 and not result["timed_out"]
    assert result["rounds"] == 2 and result["client"] == "lean", result
    assert len(result["serve_over_offline_rounds"]) == 2, result
    assert len(result["offline_tokens_per_s_rounds"]) == 2, result
    _positive_numbers(result, ["serve_output_tokens_per_s", "offline_output_tokens_per_s"])
    _positive_numbers(result, ["serve_over_offline", "ttft_p50_s", "itl_p50_s"])
    _positive_numbers(result, ["offline_matched_over_offline", "serve_over_offline_matched"])
    _positive_numbers(result, ["server_cpu_s_per_token"])
    # CPU a token by process: the HTTP process, each rank, the client processes; offline's
    for name, parts in (
        ("serve", result["cpu_us_per_token"]),
        ("offline", result["offline_cpu_us_per_token"]),
    ):
        expected = {"rank 0", "rank 1"} | ({"http", "client"} if name == "serve" else set())
        assert expected <= set(parts) and min(parts.values()) >= 0, (name, parts)
    assert result["cpu_us_per_token"]["client"] > 0, result["cpu_us_per_token"]
    # every token arrives in some chunk, a chunk carrying at least one
    assert 1 <= result["tokens_per_chunk"] <= 6, result
    # each path's per-rank counters over its rounds: both ranks ran the same microbatches,
    # of at most the path's concurrency (4 streams; offline: the 6 prompts at once, or 4)
    paths = result["rank_counters"]
    assert set(paths) == {"serve", "variant", "offline", "offline_matched"}, paths
    for path, most in (("serve", 4), ("variant", 4), ("offline", 6), ("offline_matched", 4)):
        ranks = paths[path]
        assert set(ranks) == {"rank 0", "rank 1"}, (path, ranks)
        assert ranks["rank 0"]["microbatches_per_1k_tokens"] > 0, (path, ranks)
        for key in ("microbatches_per_1k_tokens", "seqs_per_microbatch"):
            assert ranks["rank 0"][key] == ranks["rank 1"][key], (path, key, ranks)
        assert 1 <= ranks["rank 0"]["seqs_per_microbatch"] <= most, (path, ranks)
        assert ranks["rank 1"]["cpu_us_per_token"]["forward"] > 0, (path, ranks)
        assert ranks["rank 1"]["cpu_us_per_token"]["sample"] > 0, (path, ranks)
    assert paths["serve"]["rank 0"]["cpu_us_per_token"]["deltas-out"] > 0, paths
    # the A/B server (its flags and environment), its rounds paired with the first's
    variant = result["variant"]
    assert variant["flags"] == "--http-nice 5", variant
    assert variant["env"] == ["PPRUNTIME_POLL_MAX_US=400"], variant
    assert len(variant["variant_over_serve_rounds"]) == 2, variant
    _positive_numbers(variant, ["serve_output_tokens_per_s", "serve_over_offline"])
    assert {"http", "rank 0", "rank 1", "client"} <= set(variant["cpu_us_per_token"]), variant
    ttft = result["ttft_phase"]
    assert (ttft["clients"], ttft["requests"], ttft["timed_out"]) == (2, 3, False), ttft
    _positive_numbers(ttft, ["ttft_p50_s", "output_tokens_per_s"])
    assert {"checkpoint_write", "offline_start", "server_start", "rounds"} <= set(result["seconds"])


def test_bench_http_process_reports_cpu_a_token_for_each_variant():
    """The HTTP process against the fake engine, with and without uvloop/httptools: every
    stream gets all its tokens (the driver checks them against what it sent) and each
    variant's figures are reported."""
    pytest.importorskip("fastapi", reason="the serve extras install fastapi")
    args = [sys.executable, str(SCRIPTS / "bench_http_process.py"), "--variants", "fast,plain"]
    args += ["--rounds", "1", "--requests", "16", "--clients", "8", "--output-len", "8"]
    result = _run(args)
    assert set(result["variants"]) == {"fast", "plain"}, result
    for figures in result["variants"].values():
        assert len(figures["rounds"]) == 1, figures
        assert figures["http_cpu_us_per_token"] >= 0 and figures["client_cpu_us_per_token"] > 0
        assert 1 <= figures["tokens_per_chunk"] <= 8, figures
        _positive_numbers(figures, ["output_tokens_per_s"])


def test_bench_overhead_reports_the_batch_sizes_named():
    args = [sys.executable, str(SCRIPTS / "bench_overhead.py"), "--batches", "1,32,256,512"]
    result = _run([*args, "--output-len", "8"])
    _positive_numbers(result, ["us_per_step_b256", "growth_512_over_32"])
    assert [entry["batch"] for entry in result["batches"]] == [1, 32, 256, 512]


def test_bench_overhead_pp1_async_reports_host_work_per_step():
    args = [sys.executable, str(SCRIPTS / "bench_overhead.py"), "--pp1-async", "--batches", "4"]
    result = _run([*args, "--output-len", "8", "--repeats", "1", "--profile", "5"])
    _positive_numbers(result, ["host_us_per_step", "torch_ops_per_step"])
    (entry,) = result["batches"]
    assert entry["batch"] == 4, entry
    # the profile names the executor's step among the top functions
    functions = [row["function"] for row in entry["profile_us_per_step"]]
    assert len(functions) == 5 and any("executor.py" in name for name in functions), functions


def test_bench_step_cost_compares_two_trees_and_profiles_each_rank():
    """scripts/bench_step_cost.py with this checkout as its own baseline: both trees' CPU
    per iteration on both ranks, their ratio, and a profile of each rank."""
    args = [sys.executable, str(SCRIPTS / "bench_step_cost.py"), "--batches", "4"]
    args += ["--input-len", "4", "--output-len", "6", "--repeats", "1"]
    result = _run([*args, "--baseline", str(REPO_ROOT), "--profile", "3"])
    _positive_numbers(result, ["cpu_ratio_b4", "tokens_ratio_b4"])
    (entry,) = result["batches"]
    for tree in ("this", "baseline"):
        _positive_numbers(entry[tree], ["cpu_us_per_iteration", "host_us_per_iteration"])
        assert len(entry[tree]["spans_us_per_iteration"]) == 2, entry  # one per rank
        assert entry[tree]["cpu_spans_us_per_iteration"][1]["sample"] > 0, entry
    assert entry["baseline"]["package"] == str(REPO_ROOT / "ppruntime"), entry
    profiles = result["profile_us_per_iteration"]["4"]
    assert [len(rows) for rows in profiles] == [3, 3], profiles


def test_bench_inputs_counts_no_allocations_and_no_copies_off_boundary():
    args = [sys.executable, str(SCRIPTS / "bench_inputs.py"), "--preset", "tiny"]
    result = _run([*args, "--num-requests", "6", "--output-len", "40"])
    assert result["allocs_per_decode_step"] == 0, result
    assert result["block_table_copies_off_boundary"] == 0, result
    assert all(rank["decode_steps"] > 0 for rank in result["ranks"]), result


def test_bench_ingest_buffer_path_makes_no_per_token_objects():
    args = [sys.executable, str(SCRIPTS / "bench_ingest.py"), "--prompt-len", "4096"]
    result = _run([*args, "--repeats", "5"])
    _positive_numbers(result, ["buffer_over_list_speedup"])
    assert result["objects_per_request_buffer"] < 100, result
    assert result["objects_per_request_list"] > 4096, result


def test_bench_sliced_reports_every_phase():
    args = [sys.executable, str(SCRIPTS / "bench_sliced.py"), "--pings", "60", "--rounds", "2"]
    result = _run([*args, "--diff-mib", "8", "--gap-ms", "0.2"])
    _positive_numbers(
        result,
        ["p99_sliced_over_idle", "p99_unsliced_over_idle", "p99_sliced_along_over_idle"],
    )
    for phase in ("sliced", "unsliced", "sliced_along"):
        assert result[f"{phase}_diff_transfers"] > 0, result


def test_bench_channel_reports_host_and_gloo_beside_raw_mpi():
    args = [sys.executable, str(SCRIPTS / "bench_channel.py"), "--tokens", "1,32"]
    result = _run([*args, "--hidden", "64", "--reps", "3", "--warmup", "1"])
    assert result["channels"] == ["host", "gloo"], result  # CPU: both measured
    assert set(result["refused"]) == {"nccl", "cuda-aware-mpi"}, result
    for t in (1, 32):
        assert result[f"bytes_t{t}"] == t * 64 * 4, result
        keys = [
            f"{name}_{what}_t{t}" for name in ("host", "gloo") for what in ("one_way_us", "gbps")
        ]
        _positive_numbers(result, [*keys, f"mpi_one_way_us_t{t}"])


def test_generate_trace_under_mpirun(tmp_path):
    trace = tmp_path / "generate.json"
    args = [sys.executable, "-m", "ppruntime", "generate", "--prompt", "hello"]
    args += ["--max-tokens", "8", "--quiet", "--trace", str(trace)]
    result = run_mpi(2, args, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    spans = _spans(trace)
    assert set(spans) == {0, 1}
    assert "forward" in spans[0] and {"forward", "sample"} <= spans[1]


def test_bench_gpu_small_reports_every_figure(tmp_path):
    """scripts/bench_gpu.py --small on the CPU: every figure of issues 12/13, as JSON."""
    out = tmp_path / "bench_gpu.json"
    args = [sys.executable, str(SCRIPTS / "bench_gpu.py"), "--small", "--device", "cpu"]
    proc = subprocess.Popen(
        [*args, "--out", str(out), "--workdir", str(tmp_path)],
        cwd=str(REPO_ROOT),
        env=mpi_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    result = wait_mpi(proc, TIMEOUT_S)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case"))
    assert lines[header + 1].startswith("small-decode"), lines
    # the table is printed last: after its case row only its attention lines follow
    assert all(line.startswith("attention") for line in lines[header + 2 :]), lines
    report = json.loads(out.read_text())
    _positive_numbers(report, ["copy_bandwidth_bytes_per_s", "matmul_flops_per_s", "total_s"])
    [case] = report["cases"].values()
    _positive_numbers(
        case,
        [
            "decode_step_ms",
            "prefill_s",
            "decode_roofline_ms",
            "decode_roofline_fraction",
            "weight_bytes",
            "kv_bytes_at_mean_context",
            "prefill_flops_per_s",
            "prefill_matmul_fraction",
            "transformers_decode_step_ms",
            "transformers_prefill_s",
            "decode_speedup_vs_transformers",
        ],
    )
    # the roofline is the bytes over the measured bandwidth
    roofline_s = (case["weight_bytes"] + case["kv_bytes_at_mean_context"]) / report[
        "copy_bandwidth_bytes_per_s"
    ]
    assert case["decode_roofline_ms"] == pytest.approx(roofline_s * 1e3, rel=1e-6)
    # GPU-only figures are there, empty on the CPU
    assert case["gpu_busy_fraction"] is None and case["host_time_per_step_ms"] is None
    attention = report["attention"]
    if attention["status"] == "ok":  # once ppruntime.model.backends exists
        torch_decode = attention["decode"]["torch"]
        assert all(figures["ms"] > 0 for figures in torch_decode.values()), attention
        assert attention["prefill"]["torch"]["matmul_fraction"] > 0, attention
    else:
        assert attention["status"] == "unavailable" and attention["reason"], attention


def _interpreted_sweep(
    script: str, args: list[str], out
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run a kernel sweep script under TRITON_INTERPRET=1: the run and its --out JSON."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], cwd=str(REPO_ROOT),
        env=mpi_env({"TRITON_INTERPRET": "1"}), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, describe(result)
    return result, json.loads(Path(out).read_text())


def test_bench_pdl_chain_small_runs_every_choice_on_and_off(tmp_path):
    """scripts/bench_pdl_chain.py --small (interpreted triton, CPU): each matmul choice
    (cuBLAS, the engine's table, all skinny) runs the layer chain with PPRUNTIME_PDL off
    and on, the two give the same bits, and PDL is reported inactive off a Hopper GPU."""
    out = tmp_path / "pdl.json"
    result, report = _interpreted_sweep(
        "bench_pdl_chain.py",
        ["--small", "--device", "cpu", "--batches", "3", "--rounds", "1", "--out", str(out)],
        out,
    )
    assert [row["choice"] for row in report["cases"]] == ["cublas", "table", "skinny"]
    for row in report["cases"]:
        assert row["batch"] == 3 and row["same_bits"] is True and row["pdl_active"] is False
        assert row["plain_us_per_layer"] > 0 and row["pdl_us_per_layer"] > 0
        assert row["pdl_over_plain"] == pytest.approx(
            row["pdl_us_per_layer"] / row["plain_us_per_layer"]
        )
    assert "PDL / plain" in result.stdout


def test_sweep_decode_attention_small_checks_every_variant(tmp_path):
    """scripts/sweep_decode_attention.py --small (interpreted triton): each variant of the
    decode launch (store_kv + attention, as the backend runs by default) and the two
    baselines (the fused-store launch, attention alone) runs, agrees with the default
    launch and has a time."""
    out = tmp_path / "sweep.json"
    _, report = _interpreted_sweep("sweep_decode_attention.py", ["--small", "--out", str(out)], out)
    assert report["complete"] and report["fused_store"] is False
    cases = report["shapes"]["small"]
    assert len(cases) == 2
    for case in cases.values():
        assert case["default_launch"]["fused_store"] is False
        variants = {name: row for name, row in case.items() if name != "default_launch"}
        assert {"default", "single-split", "floor0", "other-store", "no-store"} <= set(variants)
        for name, row in variants.items():
            assert "error" not in row, (name, row)
            assert row["us"] > 0 and row["max_abs_diff"] < 1e-4, (name, row)


def test_sweep_decode_gemm_small_checks_every_candidate(tmp_path):
    """scripts/sweep_decode_gemm.py --small (interpreted triton): every candidate launch
    (both split-K reductions, stream-K, TMA weights, both tile orientations) agrees with
    torch and has a time beside cuBLAS's, and --out is a table skinny_config reads."""
    out = tmp_path / "table.json"
    _, report = _interpreted_sweep("sweep_decode_gemm.py", ["--small", "--out", str(out)], out)
    assert [case["label"] for case in report["cases"]] == ["small qkv m5", "small down m5"]
    assert not report["skipped"]
    for case in report["cases"]:
        assert case["cublas_us"] > 0
        kinds = set()
        for row in case["candidates"]:
            assert "error" not in row, (case["label"], row)
            assert row["us"] > 0 and row["max_error"] < 1e-5, (case["label"], row)
            config = row["config"]
            kinds.add((config["split_k"] > 1 and config["reduction"], config["weights"]))
            kinds.add(("swap", config["swap_ab"]))
            kinds.add(("programs", config["programs"]))
        assert {("partials", "pointer"), ("atomic", "descriptor"), (False, "descriptor")} <= kinds
        assert {("swap", True), ("swap", False)} <= kinds
        assert {("programs", 0), ("programs", 3), ("programs", 5)} <= kinds  # stream-K too
    # interpreted triton never beats cuBLAS: every entry says "use cuBLAS", and the table
    # skinny_config reads from that file says so too
    assert [entry["config"] for entry in report["entries"]] == [None, None]
    check = (
        "import torch\n"
        "from ppruntime.kernels.skinny_gemm import skinny_config\n"
        "print(skinny_config(5, 128, 64, torch.float32), skinny_config(4, 128, 64, torch.float32))"
    )
    lookup = subprocess.run(
        [sys.executable, "-c", check], cwd=str(REPO_ROOT), capture_output=True, text=True,
        env=mpi_env({"TRITON_INTERPRET": "1", "PPRUNTIME_SKINNY_GEMM_TABLE": str(out)}),
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert lookup.returncode == 0 and lookup.stdout.split() == ["None", "None"], lookup


def test_sweep_decode_gemm_fused_only_merges_into_the_base_table(tmp_path):
    """--small --fused-only (interpreted triton): every candidate of the fused SiLU-and-mul
    down projection agrees with torch, is timed beside silu_and_mul + cuBLAS and + the base
    table's plain launch for the down shape; --out is the base table with that batch's
    fused entry replaced and its other entries kept. A base of another device, or a named
    base that does not exist, is refused."""
    plain = {"block_m": 16, "block_n": 32, "block_k": 32, "split_k": 2}
    down = {"dtype": "float32", "n": 64, "k": 128}  # the small shape's down projection
    fused = {**down, "op": "silu_mul_linear"}
    base_entries = [
        {**down, "m": 5, "config": plain, "label": "plain down m5"},
        {**fused, "m": 5, "config": plain, "label": "stale fused m5"},
        {**fused, "m": 8, "config": None, "label": "fused m8"},
    ]
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"device": "cpu", "entries": base_entries}))
    out = tmp_path / "table.json"
    # --margin -1e9: the fastest candidate always wins (by the margin's rule), so the entry is
    # known whatever the interpreter's timings on a loaded machine (who wins is the GPU's call)
    args = ["--small", "--fused-only", "--base", str(base), "--out", str(out), "--margin=-1e9"]
    _, table = _interpreted_sweep("sweep_decode_gemm.py", args, out)
    (case,) = table["fused_sweep"]["cases"]
    assert case["label"] == "small silu_down m5" and case["op"] == "silu_mul_linear"
    assert case["cublas_us"] > 0 and case["plain_skinny_us"] > 0
    assert case["plain_config"]["split_k"] == 2 and case["same_tiles_two_kernels_us"] > 0
    reductions = set()
    for row in case["candidates"]:
        assert "error" not in row, row
        assert row["us"] > 0 and row["max_error"] < 1e-5, row
        reductions.add(row["config"]["split_k"] > 1 and row["config"]["reduction"])
    assert {False, "partials", "atomic"} <= reductions
    # the winner, the fastest candidate, in place of the stale entry; the others kept
    fastest = min(case["candidates"], key=lambda row: row["us"])["config"]
    labels = [(entry["label"], entry["config"]) for entry in table["entries"]]
    assert labels == [
        ("plain down m5", plain),
        ("fused m8", None),
        ("small silu_down m5", fastest),
    ]
    assert table["device"] == "cpu" and not table["fused_sweep"]["skipped"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"device": "NVIDIA H200", "entries": base_entries}))
    refused = subprocess.run(
        [sys.executable, str(SCRIPTS / "sweep_decode_gemm.py"), *args[:2], "--base", str(other),
         "--out", str(tmp_path / "refused.json")],
        cwd=str(REPO_ROOT), env=mpi_env({"TRITON_INTERPRET": "1"}), capture_output=True,
        text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert refused.returncode != 0 and "measured on 'NVIDIA H200'" in refused.stderr, refused
    assert not (tmp_path / "refused.json").exists()
    # a --base named but missing: refused too (--out would lose the plain entries it meant)
    missing = subprocess.run(
        [sys.executable, str(SCRIPTS / "sweep_decode_gemm.py"), *args[:2], "--base",
         str(tmp_path / "missing.json"), "--out", str(tmp_path / "refused.json")],
        cwd=str(REPO_ROOT), env=mpi_env({"TRITON_INTERPRET": "1"}), capture_output=True,
        text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert missing.returncode != 0 and "missing.json does not exist" in missing.stderr, missing
    assert not (tmp_path / "refused.json").exists()


def test_profile_decode_small_reports_matmuls_and_host_functions(tmp_path):
    """scripts/profile_decode.py --small on the CPU: the step time, each projection alone,
    and the host's cProfile of the decode steps."""
    args = [sys.executable, str(SCRIPTS / "profile_decode.py"), "--small", "--device", "cpu"]
    result = subprocess.run(
        [*args, "--out-dir", str(tmp_path), "--steps", "4"], cwd=str(REPO_ROOT),
        env=mpi_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "small-decode.json").read_text())
    assert report["decode_step_ms"] > 0 and report["steps"] == 4
    assert set(report["matmul_alone"]) == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert all(row["us"] > 0 for row in report["matmul_alone"].values())
    host = (tmp_path / "small-decode-host.txt").read_text()
    assert "last_stage.py" in host and "sample" in host, host[:2000]


def test_sweep_prefill_attention_small_checks_and_times_each_candidate(tmp_path):
    """scripts/sweep_prefill_attention.py --small on the CPU (interpreted): every
    candidate named is checked against the current kernel and timed in every case; a
    configuration past the budget is listed as skipped, not dropped."""
    out = tmp_path / "sweep.json"
    args = ["--small", "--variants", "tiled,new-kv-tma-table", "--configs", "1", "--out", str(out)]
    result, report = _interpreted_sweep("sweep_prefill_attention.py", args, out)
    assert report["matmul_flops_per_s"] > 0 and not report["skipped"]
    assert [entry["variant"] for entry in report["results"]] == ["tiled", "new-kv-tma-table"]
    for entry in report["results"]:
        assert entry["status"] == "ok", entry
        assert set(entry["cases"]) == set(report["cases"]), entry
        for figures in entry["cases"].values():
            assert figures["tolerance_excess"] <= 0 and figures["matmul_fraction"] > 0
    assert set(report["best"]) == set(report["cases"])
    assert result.stdout.rstrip().splitlines()[-1].startswith("total")
    budget = tmp_path / "budget.json"
    args = [*args[:-1], str(budget), "--budget-s", "0"]
    _, report = _interpreted_sweep("sweep_prefill_attention.py", args, budget)
    assert not report["results"] and len(report["skipped"]) == 2
