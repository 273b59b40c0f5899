"""Programmatic dependent launch (PDL, CUDA compute capability 9.0+) for the Triton kernels.

A decode step is a chain of short kernels (a few to tens of microseconds each), and each
one's start-up and tail leave the GPU part-idle. Launched with PDL, a kernel may start
while the kernel before it in the stream is still running: every kernel here first lets
its own dependent launch (`griddepcontrol.launch_dependents`, a scheduling hint), then
waits (`griddepcontrol.wait`) until the kernels before it have finished and their writes
are visible, before it reads or writes any tensor (the compile checks assert that no
memory instruction comes before the wait). Ordering is unchanged: a kernel launched
without PDL (cuBLAS, torch) waits for the whole of the one before it as always, and a
PDL kernel after one that never signals starts when that one ends. Results are bitwise
the same with PDL on or off; CUDA graphs keep the programmatic edges.

`pdl_options(device)` gives a launch's keyword arguments: the kernels' `PDL` constexpr,
and triton's `launch_pdl` where PDL is on (an NVIDIA GPU of capability >= 9, a triton that
has the instructions, not interpreted, and $PPRUNTIME_PDL not false).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ppruntime.config import DEPENDENT_LAUNCH_ENV, parse_flag

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # a triton without the griddepcontrol wrappers: PDL stays off
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


_OFF = {"PDL": False}
_ON = {"PDL": True, "launch_pdl": True}
_INTERPRET_WORDS = ("1", "true", "on", "yes")  # what triton reads TRITON_INTERPRET as


@functools.cache
def _supported(
    device_type: str, index: int | None, switch: str | None, interpret: str | None
) -> bool:
    if parse_flag(DEPENDENT_LAUNCH_ENV, switch) is False or not HAVE_GDC:
        return False
    if device_type != "cuda" or torch.version.hip is not None:  # ROCm calls its GPUs cuda
        return False
    if (interpret or "").strip().lower() in _INTERPRET_WORDS:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use programmatic dependent launch."""
    environ = os.environ
    return _supported(
        device.type,
        device.index,
        environ.get(DEPENDENT_LAUNCH_ENV),
        environ.get("TRITON_INTERPRET"),
    )


def pdl_options(device: torch.device) -> dict[str, bool]:
    """The launch keyword arguments for a kernel that takes a `PDL` constexpr."""
    return _ON if pdl_enabled(device) else _OFF


@triton.jit
def let_dependents_launch(PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()


@triton.jit
def wait_for_producers(PDL: tl.constexpr):
    """Block until the kernels before this one have finished and their writes are seen."""
    if PDL:
        gdc_wait()


@triton.jit
def begin_dependent(PDL: tl.constexpr):
    """The start of a kernel that reads nothing before its producers finish."""
    let_dependents_launch(PDL)
    wait_for_producers(PDL)
