"""The watchdog's verdict on the ranks' answers (pure: no MPI)."""

from __future__ import annotations

import pytest

from ppruntime.engine.watchdog import describe, frozen_threshold, reply_window, stalled_ranks

TIMEOUT_S = 10.0
FROZEN_S = frozen_threshold(TIMEOUT_S)


def waiting(seconds: float = 11.0, frozen_s: float = 0.0) -> dict:
    return {"state": "waiting", "for": "a header", "seconds": seconds, "frozen_s": frozen_s}


def busy(seconds: float) -> dict:
    return {"state": "busy", "seconds": seconds, "frozen_s": 0.0}


PAUSED = {"state": "paused", "seconds": 30.0, "frozen_s": 0.0}


@pytest.mark.parametrize(
    ("statuses", "verdict"),
    [
        ({0: waiting(), 1: None}, [1]),  # the last rank stopped: it cannot answer
        ({0: None, 1: waiting(), 2: waiting()}, [0]),
        ({0: PAUSED, 1: waiting(), 2: None}, [2]),  # a paused caller hides no frozen rank
        ({0: waiting(), 1: waiting(25.0, frozen_s=19.0), 2: waiting()}, [1]),  # woke up late
        ({0: PAUSED, 1: waiting()}, []),  # a slow stream consumer: only noted
        ({0: waiting(), 1: busy(12.0)}, [1]),  # a step that does not end
        ({0: waiting(), 1: busy(2.0)}, None),  # a step still within the timeout
        ({0: waiting(), 1: waiting(), 2: waiting()}, [0, 1, 2]),  # a circular wait
    ],
)
def test_verdict(statuses: dict, verdict) -> None:
    assert stalled_ranks(statuses, TIMEOUT_S, FROZEN_S) == verdict


def test_windows_and_words() -> None:
    assert reply_window(3) == 5 and reply_window(10) == 10 and reply_window(300) == 30
    assert frozen_threshold(3) == 2 and frozen_threshold(300) == 150
    assert describe(2, None, 10.0) == (
        "rank 2: no answer within 10s (stopped, stuck in a call that holds the GIL, "
        "or its node is lost)"
    )
    assert "did not run for 19.0s" in describe(1, waiting(frozen_s=19.0), 10.0, FROZEN_S)
    assert describe(1, waiting(1.5), 10.0, FROZEN_S) == "rank 1: waiting 1.5s for a header"
