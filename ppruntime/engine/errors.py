"""Errors raised by the engine for problems the caller can fix."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request carries bad user input.

    The message names the offending field and its value, for example
    ``SamplingParams.top_p must be in (0, 1], got 1.5``.
    """
