"""MPI bootstrap and communicators, run inside an MPI job of 1, 2 or 4 ranks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from collective import collective
from mpi4py import MPI

from ppruntime.comm.communicators import (
    NoThreadCommunicatorError,
    PipelineComms,
    current_thread_comm,
    thread_comm,
)
from ppruntime.comm.mpi_env import MPIConfigurationError, check_world_size, init_mpi
from ppruntime.comm.tags import Tag

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(60)]


@collective
def test_rank_info_matches_comm_world() -> None:
    info = init_mpi()
    world = MPI.COMM_WORLD
    assert (info.rank, info.size) == (world.Get_rank(), world.Get_size())
    assert info.prefix.startswith(f"[rank {info.rank}/{info.size} ")
    assert init_mpi() is info


@collective
def test_local_ranks_are_unique_per_host() -> None:
    info = init_mpi()
    everyone = MPI.COMM_WORLD.allgather((info.host, info.local_rank, info.local_size))
    by_host: dict[str, list[tuple[int, int]]] = {}
    for host, local_rank, local_size in everyone:
        by_host.setdefault(host, []).append((local_rank, local_size))
    for host, locals_ in by_host.items():
        sizes = {size for _, size in locals_}
        assert sizes == {len(locals_)}, f"{host}: local sizes {sizes} for {len(locals_)} ranks"
        assert sorted(r for r, _ in locals_) == list(range(len(locals_))), (host, locals_)


@collective
def test_thread_level_is_multiple() -> None:
    info = init_mpi()
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
    assert info.thread_level_provided == MPI.THREAD_MULTIPLE
    assert info.thread_multiple


@collective
def test_pipeline_comms_are_distinct_congruent_duplicates() -> None:
    comms = PipelineComms.create()
    try:
        roles = {"pipeline": comms.pipeline, "relay": comms.relay, "watchdog": comms.watchdog}
        for name, comm in roles.items():
            assert MPI.Comm.Compare(comm, MPI.COMM_WORLD) == MPI.CONGRUENT, name
        names = list(roles)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert MPI.Comm.Compare(roles[a], roles[b]) == MPI.CONGRUENT, (a, b)
        assert comms.relay.Get_name() == "ppruntime.relay"
        assert (comms.rank, comms.size) == (MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
    finally:
        comms.free()
    comms.free()  # idempotent


@collective
def test_relay_message_is_not_seen_on_pipeline_comm() -> None:
    comms = PipelineComms.create()
    try:
        rank, size = comms.rank, comms.size
        dest, source = (rank + 1) % size, (rank - 1) % size
        payload = np.full(4, rank, dtype=np.int32)
        send = comms.relay.Isend(payload, dest=dest, tag=Tag.SAMPLE_STATE)
        # Wait until the relay message from `source` has arrived here...
        deadline = time.monotonic() + 10
        while not comms.relay.Iprobe(source=source, tag=Tag.SAMPLE_STATE):
            assert time.monotonic() < deadline, "relay message never arrived"
            time.sleep(0.001)
        # ...then the pipeline and watchdog communicators must not show it.
        assert not comms.pipeline.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        assert not comms.watchdog.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        received = np.empty(4, dtype=np.int32)
        comms.relay.Recv(received, source=source, tag=Tag.SAMPLE_STATE)
        send.Wait()
        assert (received == source).all()
        comms.pipeline.Barrier()
    finally:
        comms.free()


@collective
def test_current_thread_comm_is_per_thread() -> None:
    comms = PipelineComms.create()
    try:
        with pytest.raises(NoThreadCommunicatorError, match="thread_comm"):
            current_thread_comm()
        seen: dict[str, object] = {}

        def relay_thread() -> None:
            try:
                current_thread_comm()
            except NoThreadCommunicatorError as exc:
                seen["before"] = exc
            with thread_comm(comms.relay):
                seen["inside"] = current_thread_comm()
                time.sleep(0.05)  # the main thread binds its own meanwhile

        thread = threading.Thread(target=relay_thread, name="relay-test")
        with thread_comm(comms.pipeline):
            thread.start()
            assert current_thread_comm() is comms.pipeline
            thread.join(timeout=10)
            assert current_thread_comm() is comms.pipeline
        assert not thread.is_alive()
        assert isinstance(seen["before"], NoThreadCommunicatorError)
        assert "relay-test" in str(seen["before"])
        assert seen["inside"] is comms.relay
        with pytest.raises(NoThreadCommunicatorError):
            current_thread_comm()
    finally:
        comms.free()


def test_tags_are_unique() -> None:
    values = [tag.value for tag in Tag]
    assert len(values) == len(set(values))
    assert all(0 <= value <= 32767 for value in values)  # MPI guarantees tags up to 32767


def test_check_world_size_message() -> None:
    check_world_size(4, 4)
    with pytest.raises(MPIConfigurationError) as raised:
        check_world_size(4, 2)
    message = str(raised.value)
    assert "\n" not in message
    assert "4" in message and "2" in message
    assert "--pp-size" in message and "mpirun -n 4" in message
