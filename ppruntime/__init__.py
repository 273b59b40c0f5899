"""ppruntime: pipeline-parallel LLM inference on MPI."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppruntime.lazy_names import lazy_getattr

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


__getattr__ = lazy_getattr(__name__, _LAZY)
