"""The busy fraction rank 0 derives from the other ranks' reports (pure arithmetic)."""

from __future__ import annotations

import pytest

from ppruntime.engine.busy_report import BusyReport, busy_fraction


def test_first_report_counts_from_the_rank_start():
    assert busy_fraction(None, BusyReport(started=10.0, now=14.0, busy_s=1.0)) == 0.25


def test_between_two_reports_of_one_rank():
    previous = BusyReport(started=10.0, now=14.0, busy_s=1.0)
    assert busy_fraction(previous, BusyReport(10.0, 16.0, 2.5)) == pytest.approx(0.75)
    assert busy_fraction(previous, BusyReport(10.0, 15.0, 1.0)) == 0.0


def test_clamped_to_zero_one_and_none_without_elapsed_time():
    previous = BusyReport(started=0.0, now=1.0, busy_s=0.5)
    assert busy_fraction(previous, BusyReport(0.0, 1.5, 1.5)) == 1.0  # clock granularity
    assert busy_fraction(previous, BusyReport(0.0, 1.0, 0.5)) is None
