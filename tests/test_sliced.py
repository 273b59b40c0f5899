"""Sliced transfers (ppruntime.comm.sliced) on one rank: MPI.COMM_SELF, no mpirun."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm import sliced
from ppruntime.comm.waiting import WaitAborted

META, SLICE = 1, 2


@pytest.fixture
def comm():
    comm = pkl5.Intracomm(MPI.COMM_SELF.Dup())
    yield comm
    comm.Free()


def test_object_round_trip_in_slices(comm):
    payload = {"logits": np.arange(10_000, dtype=np.float32), "tokens": [1, 2, 3]}
    handles = sliced.isend_object_sliced(comm, payload, [0], META, SLICE, slice_bytes=4096)
    received = sliced.recv_object_sliced(comm, 0, META, SLICE, "diff", slice_bytes=4096)
    handles.wait("diff")
    np.testing.assert_array_equal(received["logits"], payload["logits"])
    assert received["tokens"] == [1, 2, 3]


def test_stopped_receive_is_cancelled_and_frees_its_tag(comm):
    """A receive given up mid-object is cancelled (not left posted into freed memory),
    so the next message on the slice tag reaches the next receive."""
    size = 3 * 4096
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(np.zeros(size, np.uint8), protocol=5, buffer_callback=buffers.append)
    comm.send((data, [size]), 0, META)  # the object's header, but none of its slices
    with pytest.raises(WaitAborted):
        sliced.recv_object_sliced(
            comm, 0, META, SLICE, "diff", slice_bytes=4096, should_stop=lambda: True
        )
    assert sliced.ABANDONED_RECEIVES == []
    later = np.full(16, 7, np.uint8)
    send = comm.Isend([later, MPI.BYTE], 0, SLICE)
    target = np.zeros(16, np.uint8)
    comm.Recv([target, MPI.BYTE], 0, SLICE)
    send.Wait()
    np.testing.assert_array_equal(target, later)
