"""Pickling setup for MPI messages.

Small control messages travel pickled; cloudpickle lets them carry lambdas and
locally defined classes (stop criteria, test fixtures). mpi4py's lowercase API and
`mpi4py.util.pkl5` keep separate pickle instances, so both are configured.
"""

from __future__ import annotations

import pickle

import cloudpickle
from mpi4py import MPI
from mpi4py.util import pkl5

_PROTOCOL = pickle.HIGHEST_PROTOCOL  # >= 5: out-of-band buffers for numpy arrays


def register_cloudpickle() -> None:
    """Make every mpi4py pickle instance use cloudpickle with protocol 5."""
    for pickler in (MPI.pickle, pkl5.pickle):
        pickler.__init__(cloudpickle.dumps, cloudpickle.loads, _PROTOCOL)
