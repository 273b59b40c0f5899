"""Shared pytest configuration for the whole test suite.

Keep this file small; fixtures used by several test files may be added below.

tests/mpi/ holds tests that run inside an MPI job
(`mpirun -n N python -m pytest --with-mpi tests/mpi`). Without --with-mpi they are
not collected at all: tests/test_mpi_suites.py launches them under mpirun instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Open MPI's ofi BTL (libfabric), opened and then dropped by every MPI_Init on a machine
# without an OFI fabric (this one, CI), sleeps 1 s when it closes: every rank of every job
# of the suite (and this process) would wait that second. The tests' ranks talk over sm
# and tcp on one host, which is all they use; an environment that picks the BTLs keeps
# its choice. Set before anything imports mpi4py.MPI; the jobs inherit it.
os.environ.setdefault("OMPI_MCA_btl", "^ofi")

MPI_TESTS_DIR = Path(__file__).resolve().parent / "mpi"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if config.getoption("--with-mpi", default=False) or config.getoption(
        "--only-mpi", default=False
    ):
        return None
    path = Path(collection_path).resolve()
    if path == MPI_TESTS_DIR or MPI_TESTS_DIR in path.parents:
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """In-process tests use one torch thread, as every rank does (ranks share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
