#!/usr/bin/env python
"""Activation channel benchmark (issue 14): one-way latency and bandwidth of [T, hidden].

    python scripts/bench_channel.py --json
    python scripts/bench_channel.py --tokens 1,256,8192 --hidden 4096 --dtype bfloat16

One MPI job of two ranks (started by this driver). Rank 0 plays a stage sending its
activations, rank 1 the next stage receiving them, through each channel these two
ranks can use (ppruntime/comm/channels: CPU: host and gloo; CUDA: host, nccl between
distinct GPUs, cuda-aware-mpi where the MPI supports it), used exactly as the
executor uses it (send -> handle, post_receive + wait_receive into the persistent
input buffer). For each T:
  <channel>_one_way_us: median of (message + a 1-byte MPI ack back) minus half the
      median round trip of 1-byte MPI messages (the ack's share);
  <channel>_gbps: bytes / one-way time;
  mpi_one_way_us: half the median MPI ping-pong round trip of the same bytes in host
      buffers (Isend/Irecv, ppruntime's polling waits), the raw transfer;
  on CUDA also d2h_us / h2d_us: a pinned device-to-host / host-to-device copy of the
      same bytes, and host_over_sum: host one-way / (d2h + mpi one-way + h2d), the
      figure issue 14 bounds (at most 1.3 at T = 256, hidden 4096, bfloat16).
Results are per T under "sizes" and flattened as "<key>_t<T>" in the JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

ACK_TAG, PING_TAG, PONG_TAG, CHANNEL_TAG = 21, 22, 23, 24
CANDIDATES = ("host", "gloo", "nccl", "cuda-aware-mpi")


def worker(args) -> None:
    common.one_torch_thread()
    import numpy as np
    import torch
    from mpi4py import MPI

    from ppruntime.comm.channels import RankDevice, choose_channel, make_channel
    from ppruntime.comm.channels.process_group import (
        destroy_process_group,
        init_process_group_from_mpi,
    )
    from ppruntime.comm.communicators import PipelineComms
    from ppruntime.comm.mpi_env import cuda_aware_mpi, init_mpi
    from ppruntime.comm.waiting import wait_all, wait_request
    from ppruntime.config import ConfigError
    from ppruntime.device import select_device

    info = init_mpi()
    comms = PipelineComms.create()
    pipe = comms.pipeline
    rank = pipe.Get_rank()
    device = select_device(info.local_rank, args.device)
    dtype = getattr(torch, args.dtype)
    hidden = args.hidden
    tokens = [int(t) for t in args.tokens.split(",")]
    max_elements = max(tokens) * hidden
    mine = RankDevice(
        rank,
        info.host,
        device.type,
        str(device.index or 0),
        cuda_aware_mpi() if device.type == "cuda" else "no",
    )
    ranks = pipe.allgather(mine)
    usable, refused = [], {}
    for name in CANDIDATES:
        try:
            usable.append(choose_channel(name, ranks))
        except ConfigError as error:
            refused[name] = str(error)
    if any(name in usable for name in ("gloo", "nccl")):
        init_process_group_from_mpi(pipe, "nccl" if "nccl" in usable else "gloo", 120.0)
    persistent = torch.empty(max_elements, dtype=dtype, device=device)

    def input_buffer(count: int) -> torch.Tensor:
        return persistent

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one = np.zeros(1, dtype=np.uint8)

    def tiny_round_trip() -> float:
        start = time.perf_counter()
        if rank == 0:
            wait_request(pipe.Isend([one, MPI.BYTE], 1, PING_TAG), "ping")
            wait_request(pipe.Irecv([one, MPI.BYTE], 1, PONG_TAG), "pong")
        else:
            wait_request(pipe.Irecv([one, MPI.BYTE], 0, PING_TAG), "ping")
            wait_request(pipe.Isend([one, MPI.BYTE], 0, PONG_TAG), "pong")
        return time.perf_counter() - start

    def median_of(run, reps: int) -> float:
        for _ in range(args.warmup):
            run()
        pipe.Barrier()
        return statistics.median(run() for _ in range(reps))

    ack_one_way = median_of(tiny_round_trip, args.reps * 4) / 2
    sizes: dict = {}
    for name in usable:
        channel = make_channel(
            name, pipe, CHANNEL_TAG, 2, max_elements, dtype, device, input_buffer
        )
        for t in tokens:
            message = torch.ones(t, hidden, dtype=dtype, device=device)
            slot = [0]

            def hop(message=message, t=t, channel=channel, slot=slot) -> float:
                sync()
                start = time.perf_counter()
                if rank == 0:
                    handle = channel.send(slot[0] % 2, message)
                    channel.post_all()
                    wait_request(pipe.Irecv([one, MPI.BYTE], 1, ACK_TAG), "ack")
                    wait_all([handle], "channel send")
                    slot[0] += 1
                else:
                    channel.post_receive(t, hidden, channel.dtype_code)
                    channel.wait_receive(None)
                    sync()
                    wait_request(pipe.Isend([one, MPI.BYTE], 0, ACK_TAG), "ack")
                return time.perf_counter() - start

            one_way = max(median_of(hop, args.reps) - ack_one_way, 1e-9)
            entry = sizes.setdefault(str(t), {"bytes": message.numel() * message.element_size()})
            entry[f"{name}_one_way_us"] = one_way * 1e6
            entry[f"{name}_gbps"] = entry["bytes"] / one_way / 1e9
        channel.close()
    for t in tokens:
        entry = sizes.setdefault(
            str(t), {"bytes": t * hidden * torch.empty((), dtype=dtype).element_size()}
        )
        host = np.ones(entry["bytes"], dtype=np.uint8)

        def ping_pong(host=host) -> float:
            start = time.perf_counter()
            if rank == 0:
                wait_request(pipe.Isend([host, MPI.BYTE], 1, PING_TAG), "ping")
                wait_request(pipe.Irecv([host, MPI.BYTE], 1, PONG_TAG), "pong")
            else:
                wait_request(pipe.Irecv([host, MPI.BYTE], 0, PING_TAG), "ping")
                wait_request(pipe.Isend([host, MPI.BYTE], 0, PONG_TAG), "pong")
            return time.perf_counter() - start

        entry["mpi_one_way_us"] = median_of(ping_pong, args.reps) / 2 * 1e6
        if device.type == "cuda":
            on_device = torch.ones(t * hidden, dtype=dtype, device=device)
            pinned = torch.empty(t * hidden, dtype=dtype, pin_memory=True)

            def d2h(on_device=on_device, pinned=pinned) -> float:
                sync()
                start = time.perf_counter()
                pinned.copy_(on_device, non_blocking=True)
                sync()
                return time.perf_counter() - start

            def h2d(on_device=on_device, pinned=pinned) -> float:
                sync()
                start = time.perf_counter()
                on_device.copy_(pinned, non_blocking=True)
                sync()
                return time.perf_counter() - start

            entry["d2h_us"] = median_of(d2h, args.reps) * 1e6
            entry["h2d_us"] = median_of(h2d, args.reps) * 1e6
            if "host_one_way_us" in entry:
                parts = entry["d2h_us"] + entry["mpi_one_way_us"] + entry["h2d_us"]
                entry["host_over_sum"] = entry["host_one_way_us"] / parts
    if any(name in usable for name in ("gloo", "nccl")):
        destroy_process_group()
    comms.free()
    if rank == 0:
        common.emit_worker_result(
            {
                "channels": usable,
                "refused": refused,
                "device": str(device),
                "ack_one_way_us": ack_one_way * 1e6,
                "sizes": sizes,
            }
        )


def drive(args) -> int:
    run = common.run_mpi_worker(
        2,
        os.path.abspath(__file__),
        [
            "--tokens",
            args.tokens,
            "--hidden",
            str(args.hidden),
            "--dtype",
            args.dtype,
            "--reps",
            str(args.reps),
            "--warmup",
            str(args.warmup),
            *(["--device", args.device] if args.device else []),
        ],
    )
    result = {
        "hidden": args.hidden,
        "dtype": args.dtype,
        "device": run["device"],
        "channels": run["channels"],
        "refused": run["refused"],
        "ack_one_way_us": run["ack_one_way_us"],
        "sizes": run["sizes"],
    }
    lines = [
        f"one-way activation hops [T, {args.hidden}] {args.dtype} on {run['device']}, "
        f"channels: {', '.join(run['channels'])} (raw MPI ping-pong of the same bytes beside)"
    ]
    for t, entry in run["sizes"].items():
        parts = [f"T={t:>5} {entry['bytes'] / 2**20:9.3f} MiB"]
        for name in run["channels"]:
            one_way = entry[f"{name}_one_way_us"]
            parts.append(f"{name} {one_way:9.1f} us {entry[f'{name}_gbps']:6.2f} GB/s")
        parts.append(f"mpi {entry['mpi_one_way_us']:9.1f} us")
        if "host_over_sum" in entry:
            parts.append(f"host/(d2h+mpi+h2d) {entry['host_over_sum']:.2f}")
        lines.append("  " + "  ".join(parts))
        for key, value in entry.items():
            result[f"{key}_t{t}"] = value
    for name, reason in run["refused"].items():
        lines.append(f"  not measured: {name}: {reason}")
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,16,64,256,1024,4096,8192")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--reps", type=int, default=20, help="timed messages per size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu, cuda (default: one GPU per rank)")
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())
