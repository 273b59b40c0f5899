"""Rank 1 is started in deterministic mode, rank 0 not: every rank must refuse clearly.

Twice: once by the `deterministic` argument (a flag), once by PPRUNTIME_DETERMINISTIC
set on rank 1 only (an environment variable not exported to every node).
"""

import os

from mpi4py import MPI

from ppruntime import LLM
from ppruntime.config import ConfigError

RANK = MPI.COMM_WORLD.Get_rank()
try:
    LLM(preset="tiny", device="cpu", exit_workers=False, deterministic=RANK == 1)
except ConfigError as error:
    print(f"rank {RANK} caught ConfigError: {error}", flush=True)

if RANK == 1:
    os.environ["PPRUNTIME_DETERMINISTIC"] = "1"
try:
    LLM(preset="tiny", device="cpu", exit_workers=False)
except ConfigError as error:
    print(f"rank {RANK} caught ConfigError from the environment: {error}", flush=True)
