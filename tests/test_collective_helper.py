"""The @collective helper of tests/mpi: one rank's failure fails every rank, a
missing rank aborts the job instead of hanging it."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

from launching import REPO_ROOT, run_mpi

MPI_TESTS = REPO_ROOT / "tests" / "mpi"


def _run_pytest_file(tmp_path: Path, source: str, timeout: float) -> tuple[str, int, float]:
    test_file = tmp_path / "test_tmp_collective.py"
    test_file.write_text(textwrap.dedent(source))
    (tmp_path / "conftest.py").write_text("from collective import pytest_configure  # noqa\n")
    env = {"PYTHONPATH": os.pathsep.join([str(MPI_TESTS), str(REPO_ROOT)])}
    args = [sys.executable, "-m", "pytest", "--with-mpi", "-q", "-p", "no:cacheprovider"]
    args.append("--color=no")
    started = time.monotonic()
    result = run_mpi(2, [*args, str(test_file)], timeout=timeout, env=env, cwd=tmp_path)
    return result.stdout + result.stderr, result.returncode, time.monotonic() - started


def test_failure_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    output, code, _ = _run_pytest_file(
        tmp_path,
        """
        import pytest
        from collective import collective
        from mpi4py import MPI

        @collective
        def test_fails_on_rank_1():
            assert MPI.COMM_WORLD.Get_rank() != 1, "rank one is wrong"

        @collective
        def test_next_collective_still_runs():
            assert MPI.COMM_WORLD.bcast("go", root=0) == "go"

        @collective
        def test_skip_on_rank_0_skips_everywhere():
            if MPI.COMM_WORLD.Get_rank() == 0:
                pytest.skip("only rank 0 lacks it")
        """,
        timeout=60,
    )
    assert code != 0, output
    assert output.count("failed on rank(s) [1]") >= 2, output  # reported by both ranks
    assert "rank one is wrong" in output, output
    assert output.count("1 failed, 1 passed, 1 skipped") == 2, output


def test_rank_that_never_arrives_aborts_the_job(tmp_path: Path) -> None:
    output, code, elapsed = _run_pytest_file(
        tmp_path,
        """
        import time
        from collective import collective
        from mpi4py import MPI

        @collective(timeout=2)
        def test_rank_1_is_stuck():
            if MPI.COMM_WORLD.Get_rank() == 1:
                time.sleep(120)
        """,
        timeout=60,
    )
    assert code != 0, output
    assert "not every rank arrived within 2 s" in output, output
    assert elapsed < 30, f"took {elapsed:.1f} s\n{output}"
