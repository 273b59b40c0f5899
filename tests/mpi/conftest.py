"""Configuration of the tests that run inside an MPI job (see tests/conftest.py)."""

from collective import pytest_configure  # noqa: F401  (hook: uncaptured abort messages)
