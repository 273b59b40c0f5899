"""Exchanges with a deadline (ppruntime.comm.bounded), inside an MPI job of 1, 2 or 4 ranks."""

from __future__ import annotations

import time

import pytest
from collective import collective
from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.bounded import RanksMissing, allgather_within, gather_within
from ppruntime.comm.communicators import PipelineComms
from ppruntime.comm.tags import Tag

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(60)]


def _own_comm() -> pkl5.Intracomm:
    return pkl5.Intracomm(MPI.COMM_WORLD.Dup())


@collective
def test_allgather_and_gather_within_match_the_mpi_collectives() -> None:
    comm = _own_comm()
    try:
        rank, size = comm.Get_rank(), comm.Get_size()
        deadline = time.monotonic() + 30
        mine = {"rank": rank, "blob": bytes(rank * 100_000)}  # large ones go by rendezvous
        assert allgather_within(comm, mine, deadline, "test") == comm.allgather(mine)
        for root in {0, size - 1}:
            gathered = gather_within(comm, rank * 10, root, deadline, "test")
            assert gathered == (list(range(0, 10 * size, 10)) if rank == root else None)
        # two exchanges in a row match in order
        first = allgather_within(comm, ("first", rank), deadline, "test")
        second = allgather_within(comm, ("second", rank), deadline, "test")
        assert first == [("first", r) for r in range(size)]
        assert second == [("second", r) for r in range(size)]
    finally:
        comm.Free()


@collective
def test_a_rank_that_does_not_arrive_is_named() -> None:
    comm = _own_comm()
    try:
        rank, size = comm.Get_rank(), comm.Get_size()
        if size == 1:
            pytest.skip("needs two ranks")
        absent = size - 1
        if rank != absent:
            started = time.monotonic()
            with pytest.raises(RanksMissing) as missing:
                allgather_within(comm, rank, started + 0.5, "the test exchange")
            assert missing.value.ranks == [absent]
            assert missing.value.what == "the test exchange" and not missing.value.late
            assert time.monotonic() - started < 10
        comm.Barrier()  # the absent rank now takes the messages sent to it
        for source in range(size - 1):
            if rank == absent:
                assert comm.recv(source=source, tag=Tag.EXCHANGE) == source
        comm.Barrier()
    finally:
        comm.Free()


@collective
def test_pipeline_comms_with_a_deadline() -> None:
    comms = PipelineComms.create(deadline=time.monotonic() + 30)
    try:
        assert comms.relay.Get_name() == "ppruntime.relay"
        assert MPI.Comm.Compare(comms.watchdog, MPI.COMM_WORLD) == MPI.CONGRUENT
    finally:
        comms.free()
