#!/usr/bin/env python
"""Sliced-transfer benchmark (issue 6): activation latency while a 256 MiB diff is in flight.

    python scripts/bench_sliced.py --json

One MPI job of two ranks (started by this driver), phases back to back, alternated
over several rounds so that machine noise hits all of them alike. Rank 0 plays the
first stage and rank 1 the last: rank 0 ping-pongs activation-sized messages
(64 KiB) with rank 1 on the pipeline communicator, and the diff travels the way
ppruntime sends heavy diffs, from the last stage to rank 0, on the relay
communicator:
  idle:     pings only, nothing else in flight;
  sliced:   pings while a relay thread on rank 1 repeatedly sends a 256 MiB
            response diff to rank 0 with isend_object_sliced (2 MiB slices), rank
            0's relay thread receiving it;
  unsliced: the same with one slice as large as the diff;
  sliced_along: the sliced diff sent the other way, rank 0 -> rank 1, alongside
            the pings (ppruntime never sends a heavy diff that way; reported so the
            direction's effect is visible);
  copy:     a control: a thread on rank 1 copies 2 MiB buffers in memory (no MPI)
            as fast as it can, so CPU and memory-bandwidth load without transfers.
Pings are sent and received the way the executor moves activations (raw Isend /
Irecv, waited on with ppruntime's polling waits). Reports p50/p99 round-trip
latency per phase and p99_<phase>_over_idle for each loaded phase.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

META_TAG, SLICE_TAG, PING_TAG, PONG_TAG = 11, 12, 13, 14
PHASES = ("idle", "sliced", "unsliced", "sliced_along", "copy")


def worker(args) -> None:
    import numpy as np
    from mpi4py import MPI

    from ppruntime.comm.communicators import PipelineComms
    from ppruntime.comm.sliced import isend_object_sliced, recv_object_sliced
    from ppruntime.comm.waiting import wait_request

    comms = PipelineComms.create()
    pipe, relay = comms.pipeline, comms.relay
    rank = pipe.Get_rank()
    ping = np.ones(args.ping_bytes, dtype=np.uint8)
    diff = {"generation_logits": np.ones(args.diff_mib * 2**20, dtype=np.uint8)}
    huge = 2**62
    copy_only = -1  # the control phase: memory copies on rank 1, no MPI transfer
    last_to_first, first_to_last = 1, 0  # the rank that sends the diff
    phases = [
        ("idle", None, None),
        ("sliced", args.slice_bytes, last_to_first),
        ("unsliced", huge, last_to_first),
        ("sliced_along", args.slice_bytes, first_to_last),
        ("copy", copy_only, None),
    ]
    result = {name: {"latencies_s": [], "diff_transfers": 0} for name, _, _ in phases}
    per_round = max(args.pings // args.rounds, 1)
    rng = np.random.default_rng(0)
    for name, slice_bytes, diff_sender in [p for _ in range(args.rounds) for p in phases]:
        diff_receiver = None if diff_sender is None else 1 - diff_sender
        stop = threading.Event()
        transfers = [0]

        def sender(
            slice_bytes=slice_bytes, stop=stop, transfers=transfers, diff_receiver=diff_receiver
        ):
            while not stop.is_set():
                handles = isend_object_sliced(
                    relay, diff, [diff_receiver], META_TAG, SLICE_TAG, slice_bytes
                )
                handles.wait("diff")
                transfers[0] += 1
            relay.send(None, diff_receiver, META_TAG)  # end of phase (a meta message)

        def receiver(slice_bytes=slice_bytes, transfers=transfers, diff_sender=diff_sender):
            while True:
                obj = recv_object_sliced(
                    relay, diff_sender, META_TAG, SLICE_TAG, "diff", slice_bytes
                )
                if obj is None:
                    return
                transfers[0] += 1

        def copier(stop=stop):
            source = np.ones(2 * 2**20, dtype=np.uint8)
            target = np.empty_like(source)
            while not stop.is_set():
                np.copyto(target, source)
                time.sleep(0)

        thread = None
        if slice_bytes == copy_only:
            if rank == 1:
                thread = threading.Thread(target=copier, daemon=True)
                thread.start()
            time.sleep(0.2)
        elif slice_bytes is not None:
            target = sender if rank == diff_sender else receiver
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            time.sleep(0.2)  # let the first transfer get going
        latencies = []
        # random gaps: a fixed period would land every ping at the same point of rank
        # 1's polling backoff, and the p99 would measure that alignment
        gaps = rng.uniform(1 - args.gap_jitter, 1 + args.gap_jitter, per_round + 10)
        gaps *= args.gap_ms / 1000.0
        for i in range(per_round + 10):
            if rank == 0:
                start = time.perf_counter()
                send = pipe.Isend([ping, MPI.BYTE], 1, PING_TAG)
                wait_request(pipe.Irecv([ping, MPI.BYTE], 1, PONG_TAG), "pong")
                wait_request(send, "ping send")
                if i >= 10:
                    latencies.append(time.perf_counter() - start)
                time.sleep(gaps[i])  # pings spread over the transfer
            else:
                wait_request(pipe.Irecv([ping, MPI.BYTE], 0, PING_TAG), "ping")
                wait_request(pipe.Isend([ping, MPI.BYTE], 0, PONG_TAG), "pong send")
        if thread is not None:
            if rank == diff_sender or slice_bytes == copy_only:
                stop.set()
            thread.join()
        pipe.Barrier()
        if rank == 0:  # rank 0 sent or received the diffs
            result[name]["latencies_s"] += latencies
            result[name]["diff_transfers"] += transfers[0]
    comms.free()
    if rank == 0:
        common.emit_worker_result(result)


def drive(args) -> int:
    run = common.run_mpi_worker(
        2,
        os.path.abspath(__file__),
        [
            "--pings",
            str(args.pings),
            "--rounds",
            str(args.rounds),
            "--ping-bytes",
            str(args.ping_bytes),
            "--diff-mib",
            str(args.diff_mib),
            "--slice-bytes",
            str(args.slice_bytes),
            "--gap-ms",
            str(args.gap_ms),
            "--gap-jitter",
            str(args.gap_jitter),
        ],
    )
    result = {
        "ping_bytes": args.ping_bytes,
        "diff_mib": args.diff_mib,
        "slice_bytes": args.slice_bytes,
    }
    lines = [
        f"{args.ping_bytes // 1024} KiB ping round trips while a {args.diff_mib} MiB diff "
        f"is in flight on another communicator:"
    ]
    for name in PHASES:
        values = run[name]["latencies_s"]
        p50, p99 = common.percentile(values, 50), common.percentile(values, 99)
        result[f"{name}_p50_us"] = p50 * 1e6
        result[f"{name}_p99_us"] = p99 * 1e6
        result[f"{name}_diff_transfers"] = run[name]["diff_transfers"]
        lines.append(
            f"  {name:12s} p50 {p50 * 1e6:8.0f} us  p99 {p99 * 1e6:8.0f} us  "
            f"({run[name]['diff_transfers']} diffs sent during the phase)"
        )
    ratios = []
    for name in PHASES[1:]:
        key = f"p99_{name}_over_idle"
        result[key] = result[f"{name}_p99_us"] / result["idle_p99_us"]
        ratios.append(f"{key} = {result[key]:.2f}")
    lines.append(", ".join(ratios))
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=6000, help="per phase, over all rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="the phases alternate this many times (noisy machine)",
    )
    parser.add_argument("--ping-bytes", type=int, default=64 * 1024)
    parser.add_argument("--diff-mib", type=int, default=256)
    parser.add_argument("--slice-bytes", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--gap-ms", type=float, default=1.0, help="mean gap between pings")
    parser.add_argument(
        "--gap-jitter",
        type=float,
        default=0.5,
        help="gaps drawn uniformly from gap-ms x (1 -/+ this); 0 = a fixed period",
    )
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())
