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


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tracker_counts_only_time_inside_the_engine(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(waiting.time, "monotonic", clock)
    tracker = waiting.WaitTracker()
    tracker.begin("sample states from the last rank")
    clock.now += 2.0
    assert tracker.idle_seconds(clock.now) == 2.0
    tracker.pause()  # the caller holds rank 0 for a long time: not a stall
    clock.now += 100.0
    assert tracker.idle_seconds(clock.now) == 0.0
    tracker.resume()
    clock.now += 1.0
    assert tracker.idle_seconds(clock.now) == 3.0  # the wait goes on, the pause left out
    assert tracker.waiting_for == "sample states from the last rank"
    count = tracker.progress_count
    for _ in range(50):  # a caller stepping in a loop with nothing arriving
        tracker.pause()
        clock.now += 0.01
        tracker.resume()
        clock.now += 0.1
    assert abs(tracker.idle_seconds(clock.now) - 8.0) < 1e-6  # idle steps are no progress
    assert tracker.progress_count == count
    tracker.end()
    assert tracker.idle_seconds(clock.now) == 0.0
    assert tracker.progress_count == count + 1
