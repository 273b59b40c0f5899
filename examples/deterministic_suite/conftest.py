"""A reproducible test suite on ppruntime: one engine per session, in deterministic mode.

    python -m pytest examples/deterministic_suite                   # check against golden.json
    python -m pytest examples/deterministic_suite --update-golden   # rewrite golden.json

Deterministic mode (`deterministic=True`, or PPRUNTIME_DETERMINISTIC=1) gives the same
tokens and log-probs on every run with the same model, device kind and PP layout. The
engine starts once per session (the costly part) and every test shares it. Golden
values belong to one device kind: this suite pins the CPU. Under mpirun, every rank
runs pytest; rank 0 drives the engine, the others serve it inside `LLM(...)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ppruntime import LLM


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="write the outputs of this run to golden.json instead of comparing with it",
    )


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def llm() -> Iterator[LLM]:
    # your checkpoint here: LLM(model="/path/to/checkpoint", deterministic=True, ...)
    with LLM(preset="tiny-trained", deterministic=True, device="cpu") as engine:
        yield engine
