#!/usr/bin/env python
"""Ingest benchmark (issue 6): a 16k-token prompt submitted and propagated to every rank.

    python scripts/bench_ingest.py --json

Two ranks (one MPI job started by this driver). For each request rank 0 does what
the engine does at the API boundary and on the wire, and rank 1 what a downstream
rank does on receipt; rank 1 then acknowledges, and rank 0 times the round trip:

  buffer: validate_prompt_token_ids() copies the prompt once into an int32 array
          of its own (the caller may reuse its buffer); the engine's own control
          path (ppruntime.engine.control: isend_control / recv_control) sends one
          flat int32 message with the request's id, length and numeric sampling
          parameters, and the prompt as one int32 message straight from that
          validated copy; rank 1 rebuilds the SeqInfos (the prompt is a view of
          the received buffer, no copy).
  list:   what a list-based design would do: the prompt stays a Python list of
          ints, validated element by element, pickled inside the same message, and
          unpickled into a list of ints on rank 1.
Both variants also admit the prompt on the first stage (rank 0): it is written into
a preallocated token-table row, as SequenceTable.admit does.

The two variants alternate request by request (back to back). The headline,
buffer_over_list_speedup, is the ratio of median host costs: rank 0's submit
(validate/convert, pickle, post the send) plus rank 1's receive (from the moment
the message is matched: receive, unpickle, rebuild the request). The whole round
trip (submit, transfer, rebuild, ack) is reported too. Python objects created per
request: sys.getallocatedblocks() deltas over requests kept alive (rank 0's submit
side plus rank 1's receive side).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

VOCAB = 32000
ACK_TAG = 77
KEEP = 8  # requests kept alive per variant to count the objects they hold


def worker(args) -> None:
    import gc
    import pickle

    import numpy as np
    from mpi4py import MPI

    from ppruntime.comm.communicators import PipelineComms
    from ppruntime.comm.tags import Tag
    from ppruntime.comm.waiting import wait_raw_message
    from ppruntime.engine.control import Control, NewRequests, isend_control, recv_control
    from ppruntime.engine.sampling_params import SamplingParams, validate_prompt_token_ids

    comms = PipelineComms.create()
    comm = comms.pipeline
    rank = comm.Get_rank()
    params = SamplingParams(max_tokens=16)
    rng = np.random.default_rng(0)
    prompt_array = rng.integers(0, VOCAB, size=args.prompt_len, dtype=np.int32)
    prompt_list = prompt_array.tolist()  # the same prompt as a Python list of ints
    ack = np.zeros(1, dtype=np.float64)  # carries rank 1's receive cost back
    variants = ("buffer", "list")

    token_table = np.zeros(args.prompt_len + 16, dtype=np.int32)  # a first-stage table row

    def submit(variant: str, seq_id: int):
        if variant == "buffer":
            tokens = validate_prompt_token_ids(prompt_array, VOCAB, args.prompt_len + 16)
            lengths = np.array([tokens.shape[0]], dtype=np.int64)
        else:
            tokens = list(prompt_list)
            if not all(type(t) is int and 0 <= t < VOCAB for t in tokens):
                raise ValueError("bad token")
            lengths = [len(tokens)]
        # admission on the first stage (rank 0): the prompt is written into the pooled
        # token table, as SequenceTable.admit does
        token_table[: args.prompt_len] = tokens
        return Control(
            new=NewRequests(
                seq_ids=np.array([seq_id], dtype=np.int64),
                request_ids=[f"req-{seq_id}"],
                prompt_lengths=lengths,
                prompt_tokens=tokens,
                params=[params],
            )
        )

    def send(variant: str, control) -> list:
        keep: list = []
        if variant == "buffer":
            return isend_control(comm, control, 1, keep) + [keep]
        payload = np.frombuffer(pickle.dumps(control, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        return [comm.Isend([payload, MPI.BYTE], 1, Tag.MICROBATCH_CONTROL), payload]

    def receive(variant: str, cost: list | None = None):
        while not comm.Iprobe(0, Tag.MICROBATCH_CONTROL):  # spin: no backoff in what is timed
            pass
        start = time.perf_counter()  # the message is here: from now on it is cost
        if cost is not None:
            cost.append(start)
        if variant == "buffer":
            return recv_control(comm, 0).new.infos()
        payload = wait_raw_message(comm, 0, Tag.MICROBATCH_CONTROL, "list", dtype=np.uint8)
        return pickle.loads(payload).new  # list design: the list of ints is the payload

    times = {v: [] for v in variants}  # round trip, waits included
    costs = {v: [] for v in variants}  # rank 0 submit + rank 1 receive, waits excluded
    objects = {}
    if rank == 0:
        for i in range(args.repeats + 2):
            for variant in variants:
                start = time.perf_counter()
                control = submit(variant, i)
                sent = send(variant, control)
                posted = time.perf_counter()
                MPI.Request.Waitall([r for r in sent if isinstance(r, MPI.Request)])
                comm.Recv([ack, MPI.DOUBLE], 1, ACK_TAG)
                elapsed = time.perf_counter() - start
                if i >= 2:  # the first two are warm-up
                    times[variant].append(elapsed)
                    costs[variant].append(posted - start + float(ack[0]))
        # objects created per request on rank 0's submit side
        for variant in variants:
            gc.collect()
            before = sys.getallocatedblocks()
            kept = [submit(variant, j) for j in range(KEEP)]
            objects[variant + "_submit"] = (sys.getallocatedblocks() - before) / KEEP
            del kept
    else:
        for _ in range(args.repeats + 2):
            for variant in variants:
                started: list = []
                received = receive(variant, started)
                ack[0] = time.perf_counter() - started[0]
                del received
                comm.Send([ack, MPI.DOUBLE], 0, ACK_TAG)
    # objects created per request on the receiving rank (kept alive, then counted)
    for variant in variants:
        if rank == 0:
            for j in range(KEEP):
                sent = send(variant, submit(variant, j))
                MPI.Request.Waitall([r for r in sent if isinstance(r, MPI.Request)])
        else:
            gc.collect()
            before = sys.getallocatedblocks()
            kept = [receive(variant) for _ in range(KEEP)]
            objects[variant + "_receive"] = (sys.getallocatedblocks() - before) / KEEP
            del kept
    gathered = comm.gather(objects, root=0)
    comms.free()
    if rank == 0:
        merged = {}
        for part in gathered:
            merged.update(part)
        common.emit_worker_result(
            {
                "buffer_s": costs["buffer"],
                "list_s": costs["list"],
                "buffer_rtt_s": times["buffer"],
                "list_rtt_s": times["list"],
                "objects": merged,
            }
        )


def drive(args) -> int:
    run = common.run_mpi_worker(
        2,
        os.path.abspath(__file__),
        ["--prompt-len", str(args.prompt_len), "--repeats", str(args.repeats)],
    )
    buffer_p50 = common.percentile(run["buffer_s"], 50)
    list_p50 = common.percentile(run["list_s"], 50)
    buffer_rtt = common.percentile(run["buffer_rtt_s"], 50)
    list_rtt = common.percentile(run["list_rtt_s"], 50)
    objects = run["objects"]
    result = {
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "buffer_us_p50": buffer_p50 * 1e6,
        "list_us_p50": list_p50 * 1e6,
        "buffer_over_list_speedup": list_p50 / buffer_p50,
        "buffer_rtt_us_p50": buffer_rtt * 1e6,
        "list_rtt_us_p50": list_rtt * 1e6,
        "rtt_speedup": list_rtt / buffer_rtt,
        "objects_per_request_buffer": objects["buffer_submit"] + objects["buffer_receive"],
        "objects_per_request_list": objects["list_submit"] + objects["list_receive"],
        "objects_per_request_detail": objects,
    }
    lines = [
        f"{args.prompt_len}-token prompt, submit + propagate to rank 1, median of {args.repeats}:",
        f"  int32 buffer: {result['buffer_us_p50']:.1f} us host cost, "
        f"{result['objects_per_request_buffer']:.0f} Python objects per request",
        f"  Python list : {result['list_us_p50']:.1f} us host cost, "
        f"{result['objects_per_request_list']:.0f} Python objects per request",
        f"  round trip: buffer {buffer_rtt * 1e6:.0f} us, list "
        f"{list_rtt * 1e6:.0f} us ({list_rtt / buffer_rtt:.1f}x)",
        f"buffer_over_list_speedup (host cost, rank 0 submit + rank 1 receive) = "
        f"{result['buffer_over_list_speedup']:.1f}",
    ]
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=200)
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())
