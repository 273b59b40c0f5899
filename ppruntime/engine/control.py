"""New requests and cancellations on their way down the ranks (DESIGN §2.1).

Rank 0 sends, with an iteration's MICROBATCH header, one control message: the
requests that entered and the cancellations. The prompts of all new requests travel
as ONE raw int32 buffer (their concatenation, never a list of ints); the rest (ids,
lengths, sampling parameters, cancellations) is small and pickled with the standard
pickler. Per-request cost on the wire does not grow with the prompt's length beyond
the bytes themselves.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import WaitTracker, wait_raw_message
from ppruntime.engine.seq_table import SeqInfo


@dataclass
class NewRequests:
    """Requests entering in one iteration: all prompts in ONE int32 buffer."""

    seq_ids: np.ndarray  # [N] int64
    request_ids: list[str]
    prompt_lengths: np.ndarray  # [N] int64
    prompt_tokens: np.ndarray  # [sum(lengths)] int32
    params: list

    def infos(self) -> list[SeqInfo]:
        """Per-request views into the one prompt buffer (no copies)."""
        bounds = np.concatenate([[0], np.cumsum(self.prompt_lengths)]).tolist()
        return [
            SeqInfo(seq_id, request_id, self.prompt_tokens[start:end], params)
            for seq_id, request_id, start, end, params in zip(
                self.seq_ids.tolist(), self.request_ids, bounds[:-1], bounds[1:], self.params
            )
        ]


@dataclass
class Control:
    """New requests and cancellations, applied by every rank in the same iteration."""

    new: NewRequests | None = None
    aborts: list[int] = field(default_factory=list)  # seq ids


def isend_control(
    comm: MPI.Comm, control: Control, dest: int, keep_alive: list[object]
) -> list[MPI.Request]:
    """Start sending `control`; the buffers are appended to `keep_alive`."""
    new = control.new
    prompts = new.prompt_tokens if new is not None else None
    meta = (
        None if new is None else (new.seq_ids, new.request_ids, new.prompt_lengths, new.params),
        control.aborts,
    )
    meta_bytes = np.frombuffer(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    keep_alive.append(meta_bytes)
    requests = [comm.Isend([meta_bytes, MPI.BYTE], dest, Tag.MICROBATCH_CONTROL)]
    if prompts is not None:
        prompts = np.ascontiguousarray(prompts, dtype=np.int32)
        keep_alive.append(prompts)
        requests.append(comm.Isend([prompts, MPI.BYTE], dest, Tag.PROMPT_TOKENS))
    return requests


def recv_control(comm: MPI.Comm, source: int, tracker: WaitTracker | None = None) -> Control:
    """Receive a control message sent by `isend_control` (the caller knows one is due)."""
    meta_bytes = wait_raw_message(
        comm,
        source,
        Tag.MICROBATCH_CONTROL,
        f"control from rank {source}",
        dtype=np.uint8,
        tracker=tracker,
    )
    new_meta, aborts = pickle.loads(meta_bytes)
    new = None
    if new_meta is not None:
        seq_ids, request_ids, lengths, params = new_meta
        prompts = wait_raw_message(
            comm,
            source,
            Tag.PROMPT_TOKENS,
            f"prompt tokens from rank {source}",
            dtype=np.int32,
            tracker=tracker,
        )
        new = NewRequests(seq_ids, request_ids, lengths, prompts, params)
    return Control(new=new, aborts=aborts)
