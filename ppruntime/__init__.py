"""ppruntime: pipeline-parallel LLM inference on MPI."""

__version__ = "0.1.0"
