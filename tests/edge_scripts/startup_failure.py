"""Rank 1 fails to allocate its KV cache; every rank must raise StartupError, then exit 0."""

from mpi4py import MPI

import ppruntime.engine.engine as engine_module

RANK = MPI.COMM_WORLD.Get_rank()
_allocate = engine_module.allocate_kv_cache


def allocate_or_fail(*args, **kwargs):
    if RANK == 1:
        raise MemoryError("simulated: the KV cache does not fit on this rank")
    return _allocate(*args, **kwargs)


engine_module.allocate_kv_cache = allocate_or_fail

from ppruntime import LLM  # noqa: E402
from ppruntime.engine.engine import StartupError  # noqa: E402

try:
    LLM(preset="tiny", device="cpu", exit_workers=False)
except StartupError as error:
    print(f"rank {RANK} caught StartupError: {error}", flush=True)
