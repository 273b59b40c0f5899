"""What the compile checks assert of a kernel compiled with programmatic dependent launch."""

from __future__ import annotations

import re

# global memory, TMA and prefetches; kernel parameters (ld.param) and shared memory may come first
GLOBAL_ACCESS = re.compile(r"\b(ld\.global|st\.global|atom\.|red\.|cp\.async|prefetch\.)")


def assert_waits_before_memory(ptx: str, name: str) -> None:
    """The kernel waits for its producers (griddepcontrol.wait) before it touches memory."""
    wait = ptx.find("griddepcontrol.wait")
    assert wait >= 0, f"{name}: no griddepcontrol.wait"
    first = GLOBAL_ACCESS.search(ptx)
    assert first is None or first.start() > wait, (
        f"{name}: {first.group(0)} before griddepcontrol.wait"
    )
