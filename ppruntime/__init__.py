"""ppruntime: pipeline-parallel LLM inference on MPI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppruntime.api.llm import LLM
    from ppruntime.engine.errors import InvalidRequestError
    from ppruntime.engine.outputs import RequestOutput
    from ppruntime.engine.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "InvalidRequestError", "RequestOutput", "SamplingParams", "__version__"]

# imported on first use: `import ppruntime.x` must not import the engine (and MPI with
# it), e.g. in serve's HTTP process (api/http_process.py)
_LAZY = {
    "LLM": "ppruntime.api.llm",
    "InvalidRequestError": "ppruntime.engine.errors",
    "RequestOutput": "ppruntime.engine.outputs",
    "SamplingParams": "ppruntime.engine.sampling_params",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ppruntime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
