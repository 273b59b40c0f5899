"""ppruntime: pipeline-parallel LLM inference on MPI."""

from ppruntime.api.llm import LLM
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.outputs import RequestOutput
from ppruntime.engine.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "InvalidRequestError", "RequestOutput", "SamplingParams", "__version__"]
