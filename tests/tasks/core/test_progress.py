"""Progress: a bar on a terminal, periodic log lines anywhere else (dvc repro under nohup, CI, Prefect)."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from tqdm import tqdm

from tasks.core.progress import LogProgress, show_progress

LOG = logging.getLogger("tasks.curate.extract")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_reports_every_interval_and_once_at_the_end(tasks_log):
    clock = Clock()
    with LogProgress("extract", 100, "trace", LOG, interval=30, clock=clock) as progress:
        for _ in range(4):
            clock.now += 10  # 10 s per 25 traces: a line at 30 s only
            progress.update(25)
    assert [r.getMessage() for r in tasks_log] == [
        "extract: 75/100 traces (75%), 2.5 traces/s, about 10 s left",
        "extract: 100/100 traces (100%), 2.5 traces/s in 40 s",
    ]


def test_unknown_total_is_set_later_as_fine_tuning_does(tasks_log):
    clock = Clock()
    with LogProgress("fine-tune", None, "step", LOG, interval=60, clock=clock) as progress:
        assert progress.line() == "fine-tune: 0 steps, 0 steps/s"
        progress.total = 8
        clock.now = 4
        progress.update(8)
    assert tasks_log[-1].getMessage() == "fine-tune: 8/8 steps (100%), 2 steps/s in 4 s"


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.setenv("GRACE_PROGRESS", "log")
    assert isinstance(show_progress("extract", 3, "trace", LOG), LogProgress)
    monkeypatch.setenv("GRACE_PROGRESS", "bar")
    bar = show_progress("extract", 3, "trace", LOG)
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("GRACE_PROGRESS", "auto")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, as under nohup or CI
    assert isinstance(show_progress("extract", 3, "trace", LOG), LogProgress)
    monkeypatch.setenv("GRACE_PROGRESS", "sometimes")
    with pytest.raises(ValueError, match="GRACE_PROGRESS"):
        show_progress("extract", 3, "trace", LOG)
