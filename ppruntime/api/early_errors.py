"""Bad input reported before MPI starts and before torch is imported.

Every rank of a job parses the same argv, so an error argv alone decides (a sampling
parameter, a flag value, a prompt given on the command line) is found by every rank
on its own: each ends with status 2, rank 0 (as the launcher numbers it) printing
the message, with no MPI to agree over. Started alone, rank 0's whole input check
(files included) runs this way too. Errors that can differ between ranks (a file one
rank cannot read, a log directory) still go through MPI (`agree_on_error`).

The early check only runs when the settings `bootstrap` checks first would pass, so
that the message is the one the check after MPI would print.
"""

from __future__ import annotations

import os
import sys
import time

from ppruntime.bootstrap import torch_threads
from ppruntime.comm.launcher import launcher_rank
from ppruntime.config import ConfigError
from ppruntime.logs import check_log_level

EXIT_BAD_INPUT = 2
# Launchers end the job when its first rank exits non-zero, which could be before rank
# 0's message is out: the other ranks wait this long for rank 0 to print and exit
# (mpirun then ends them), and exit after it if the launcher does not.
OTHER_RANKS_LINGER_S = 10.0


def bootstrap_would_pass(log_level: str | None, log_dir: str | None) -> bool:
    """True when `bootstrap` cannot fail here: a valid log level and thread count,
    and no log directory (whose check is each rank's own)."""
    if log_dir or os.environ.get("PPRUNTIME_LOG_DIR"):
        return False
    try:
        check_log_level(log_level)
        torch_threads()
    except ConfigError:
        return False
    return True


def report_early(command: str, error: str) -> int:
    """Print `error` (on rank 0) as the check after MPI would, and give the status."""
    if launcher_rank() == 0:
        print(f"ppruntime {command}: error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANKS_LINGER_S)
    return EXIT_BAD_INPUT
