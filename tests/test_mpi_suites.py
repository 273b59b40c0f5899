"""Runs tests/mpi inside MPI jobs of 1, 2 and 4 ranks (4 oversubscribes small machines)."""

from __future__ import annotations

import sys

import pytest
from launching import describe, run_mpi

SUITE_TIMEOUT_S = 240


@pytest.mark.timeout(SUITE_TIMEOUT_S + 30)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mpi_suite(ranks: int) -> None:
    args = [sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider"]
    args += ["--color=no", "--tb=short", "tests/mpi"]
    result = run_mpi(ranks, args, timeout=SUITE_TIMEOUT_S)
    assert result.returncode == 0, f"tests/mpi failed with {ranks} rank(s):\n{describe(result)}"
