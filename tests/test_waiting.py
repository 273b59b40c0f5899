"""The pacing of background polls (no MPI: the sleeping policy alone)."""

import threading
import time

from ppruntime.comm import waiting
from ppruntime.comm.waiting import Hurry, PacedBackoff


def test_a_waiting_consumer_wakes_a_slow_poller_at_once():
    hurry = Hurry()
    woke = threading.Event()

    def poller():
        hurry.sleep(30.0)  # a slow poll while nobody waits
        woke.set()

    thread = threading.Thread(target=poller, daemon=True)
    thread.start()
    time.sleep(0.05)
    assert not woke.is_set()
    hurry.begin()
    assert woke.wait(5.0), "begin() must end the poller's sleep"
    thread.join(5.0)


def test_paced_backoff_is_slow_while_idle_and_fast_while_hurried(monkeypatch):
    slept: list[tuple[str, float]] = []

    class RecordingHurry(Hurry):
        __slots__ = ()

        def sleep(self, seconds: float) -> None:
            slept.append(("slow", seconds))

    hurry = RecordingHurry()
    monkeypatch.setattr(waiting.time, "sleep", lambda seconds: slept.append(("fast", seconds)))
    backoff = PacedBackoff(hurry)
    for _ in range(6):
        backoff.sleep()
    slow = [seconds for kind, seconds in slept]
    assert all(kind == "slow" for kind, _ in slept)
    assert slow[0] == waiting.BACKGROUND_FIRST_SLEEP_S
    assert slow == sorted(slow) and slow[-1] <= waiting.BACKGROUND_MAX_SLEEP_S
    slept.clear()
    hurry.begin()
    for _ in range(12):
        backoff.sleep()
    assert all(kind == "fast" for kind, _ in slept)
    assert slept[0][1] == 0  # first hurried poll: only yield
    assert max(seconds for _, seconds in slept) <= waiting.MAX_SLEEP_S
    hurry.end()
    slept.clear()
    backoff.sleep()
    assert slept[0][0] == "slow"
