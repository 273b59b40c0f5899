"""Collectives that give up at a deadline and say which ranks did not arrive.

MPI's collectives block until every rank has joined; a rank that is stopped, stuck
in a call or on a lost node leaves the others inside them forever, with nothing to
tell which rank is missing. The start-up and shutdown exchanges of ppruntime are
therefore point-to-point messages (every rank sends its object to every other one)
polled with backoff until a deadline: ranks whose object did not arrive in time
are named in `RanksMissing`. Pipelines have a few ranks, so the n^2 small messages
cost nothing; messages between two ranks do not overtake each other, so exchanges
made one after another on one communicator and tag match in order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import Backoff, request_done

# Start-up waits may last minutes (another rank loading its weights): poll slowly.
_MAX_SLEEP_S = 0.005


class RanksMissing(RuntimeError):
    """Some ranks did not take part in an exchange before its deadline."""

    def __init__(self, ranks: Sequence[int], what: str, late: bool = False) -> None:
        self.ranks = sorted(ranks)
        self.what = what
        self.late = late  # this rank itself arrived after the deadline
        super().__init__(f"{describe_ranks(self.ranks)} did not arrive at {what}")


def describe_ranks(ranks: Sequence[int]) -> str:
    """'rank 2' or 'ranks 1, 2'."""
    ranks = sorted(ranks)
    if not ranks:
        return "some rank"  # a collective does not say which
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))


def allgather_within(
    comm: pkl5.Intracomm, obj: object, deadline: float, what: str, tag: int = Tag.EXCHANGE
) -> list[object]:
    """Every rank's `obj`, in rank order, or RanksMissing at `deadline` (monotonic)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    peers = [peer for peer in range(size) if peer != rank]
    sends = {peer: comm.isend(obj, peer, tag) for peer in peers}
    received = _receive_from(comm, peers, deadline, what, tag)
    _wait_sends(sends, deadline, what)
    received[rank] = obj
    return [received[peer] for peer in range(size)]


def gather_within(
    comm: pkl5.Intracomm,
    obj: object,
    root: int,
    deadline: float,
    what: str,
    tag: int = Tag.EXCHANGE,
) -> list[object] | None:
    """Like `comm.gather(obj, root)` (None off the root), or RanksMissing at `deadline`."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if rank != root:
        _wait_sends({root: comm.isend(obj, root, tag)}, deadline, what)
        return None
    peers = [peer for peer in range(size) if peer != rank]
    received = _receive_from(comm, peers, deadline, what, tag)
    received[rank] = obj
    return [received[peer] for peer in range(size)]


def idup_within(comm: MPI.Intracomm, deadline: float, what: str) -> MPI.Intracomm:
    """`comm.Dup()` that gives up at `deadline` (a collective: no rank can be named)."""
    duplicate, request = comm.Idup()
    backoff = Backoff(_MAX_SLEEP_S)
    while not request.Test():
        if time.monotonic() > deadline:
            raise RanksMissing([], what)
        backoff.sleep()
    return duplicate


def _receive_from(
    comm: pkl5.Intracomm, peers: list[int], deadline: float, what: str, tag: int
) -> dict[int, object]:
    received: dict[int, object] = {}
    missing = list(peers)
    late = time.monotonic() > deadline
    backoff = Backoff(_MAX_SLEEP_S)
    while missing:
        for peer in list(missing):
            message = comm.improbe(peer, tag)
            if message is not None:
                received[peer] = message.recv()
                missing.remove(peer)
                backoff.reset()
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RanksMissing(missing, what, late)
        backoff.sleep()
    return received


def _wait_sends(sends: dict[int, pkl5.Request], deadline: float, what: str) -> None:
    """Each send completes once its peer has taken it (at once for small messages)."""
    backoff = Backoff(_MAX_SLEEP_S)
    pending = dict(sends)
    while pending:
        pending = {peer: r for peer, r in pending.items() if not request_done(r)}
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RanksMissing(list(pending), what)
        backoff.sleep()
