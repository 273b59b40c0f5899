"""Rank 1 is started in deterministic mode, rank 0 not: every rank must refuse clearly."""

from mpi4py import MPI

from ppruntime import LLM
from ppruntime.config import ConfigError

RANK = MPI.COMM_WORLD.Get_rank()
try:
    LLM(preset="tiny", device="cpu", exit_workers=False, deterministic=RANK == 1)
except ConfigError as error:
    print(f"rank {RANK} caught ConfigError: {error}", flush=True)
