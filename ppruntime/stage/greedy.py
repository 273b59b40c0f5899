"""Where sampling turns greedy: a constant the request checks share with the samplers,
in a module without torch (the CLI validates requests before importing it)."""

from __future__ import annotations

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``). Dividing float32
logits by a smaller temperature overflows (1e-40 turns every logit above 3.4e-2 into
inf, and softmax into NaN), and anything this sharp is an argmax anyway: a logit gap
of 1e-3 already weighs ``exp(100)`` to one at 1e-5."""
