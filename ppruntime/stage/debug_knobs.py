"""Debug knobs that make one stage slow, stall or fail (tests and benchmarks).

PPRUNTIME_STAGE_DELAY_MS=rank:ms[,rank:ms]  sleep `ms` in every forward of `rank`
PPRUNTIME_FAULT=rank:step                   raise in the forward number `step` of `rank`
PPRUNTIME_STALL=rank:step                   hang (sleep forever) at forward `step` of `rank`
PPRUNTIME_STALL_GIL=rank:step               hang there inside a C call that holds the GIL
                                            (no thread of that rank runs any more)
PPRUNTIME_PYTHON_WORK_MS=rank:ms[,rank:ms]  busy-loop `ms` in pure Python (holding the GIL)
                                            before every forward of `rank` (GIL pressure)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


class InjectedFault(RuntimeError):
    """Raised by the PPRUNTIME_FAULT knob."""


def _parse_pairs(name: str, text: str | None, value_type: type) -> dict[int, float]:
    if not text:
        return {}
    pairs: dict[int, float] = {}
    for item in text.split(","):
        rank, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            pairs[int(rank)] = value_type(value)
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected rank:value[,rank:value]") from None
    return pairs


@dataclass(frozen=True)
class StageKnobs:
    delay_s: float = 0.0
    fault_step: int | None = None
    stall_step: int | None = None
    gil_stall_step: int | None = None
    python_work_s: float = 0.0

    @classmethod
    def from_env(cls, rank: int, environ: dict[str, str] | None = None) -> StageKnobs:
        env = os.environ if environ is None else environ
        delays = _parse_pairs(
            "PPRUNTIME_STAGE_DELAY_MS", env.get("PPRUNTIME_STAGE_DELAY_MS"), float
        )
        faults = _parse_pairs("PPRUNTIME_FAULT", env.get("PPRUNTIME_FAULT"), int)
        stalls = _parse_pairs("PPRUNTIME_STALL", env.get("PPRUNTIME_STALL"), int)
        gil_stalls = _parse_pairs("PPRUNTIME_STALL_GIL", env.get("PPRUNTIME_STALL_GIL"), int)
        work = _parse_pairs("PPRUNTIME_PYTHON_WORK_MS", env.get("PPRUNTIME_PYTHON_WORK_MS"), float)
        return cls(
            delay_s=delays.get(rank, 0.0) / 1000.0,
            fault_step=int(faults[rank]) if rank in faults else None,
            stall_step=int(stalls[rank]) if rank in stalls else None,
            gil_stall_step=int(gil_stalls[rank]) if rank in gil_stalls else None,
            python_work_s=work.get(rank, 0.0) / 1000.0,
        )

    def before_forward(self, rank: int, step: int) -> None:
        if self.fault_step is not None and step == self.fault_step:
            raise InjectedFault(
                f"PPRUNTIME_FAULT: injected failure in forward {step} of rank {rank}"
            )
        if self.stall_step is not None and step == self.stall_step:
            while True:  # a stalled stage, for the watchdog to find
                time.sleep(1.0)
        if self.gil_stall_step is not None and step == self.gil_stall_step:
            _hold_the_gil_forever()
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.python_work_s:
            _busy_python(self.python_work_s)


def _hold_the_gil_forever() -> None:
    """A C call that never returns and keeps the GIL (ctypes.PyDLL does not release it)."""
    import ctypes

    libc = ctypes.PyDLL(None)
    while True:  # a signal only interrupts one sleep
        libc.sleep(3600)


def _busy_python(seconds: float) -> int:
    """Pure-Python work for `seconds`: holds the GIL but for the interpreter's switches."""
    end = time.perf_counter() + seconds
    total = 0
    while time.perf_counter() < end:
        for value in range(200):
            total += value * value
    return total
