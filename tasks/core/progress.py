"""Progress a person sees in a terminal and a log file sees as lines.

tqdm on its own (`disable=None`) hides itself when stderr is not a terminal, so `dvc repro` under
nohup, a scheduler, CI or a Prefect worker printed nothing for half an hour. `show_progress()` gives a
tqdm bar on a terminal and, anywhere else, a counter that logs one line to the stage's logger every
`GRACE_PROGRESS_SECONDS` (default 30) and one when it closes:
    extract: 480/1770 traces (27%), 3.1 traces/s, about 7 min left
`GRACE_PROGRESS=bar` or `=log` forces one of the two (the Prefect flow asks for log lines: they go
to the run log). Both answer tqdm's `update(n)` and `total`, and are context managers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


class LogProgress:
    """tqdm's update/total/close, reported as a log line at most every `interval` seconds."""

    def __init__(self, desc: str, total: int | None, unit: str, logger: logging.Logger, interval: float,
                 clock=time.monotonic) -> None:
        self.desc, self.total, self.unit, self.logger, self.interval, self.clock = desc, total, unit, logger, interval, clock
        self.n = 0
        self.started = self.last = clock()

    def line(self) -> str:
        elapsed = self.clock() - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit}s ({self.n / self.total:.0%})" if self.total else f"{self.n} {self.unit}s"
        text = f"{self.desc}: {done}, {rate:.3g} {self.unit}s/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", about {_duration((self.total - self.n) / rate)} left"
        return text

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self.last = self.clock()
            self.logger.info(self.line())

    def close(self) -> None:
        self.logger.info("%s in %s", self.line(), _duration(self.clock() - self.started))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


Progress = tqdm | LogProgress


def show_progress(desc: str, total: int | None, unit: str, logger: logging.Logger, leave: bool = True):
    """A tqdm bar on a terminal, periodic log lines elsewhere (see the module docstring)."""
    mode = os.environ.get("GRACE_PROGRESS", "auto")
    if mode not in ("auto", "bar", "log"):
        raise ValueError(f"GRACE_PROGRESS={mode!r}: use auto, bar or log")
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return LogProgress(desc, total, unit, logger, float(os.environ.get("GRACE_PROGRESS_SECONDS", "30")))
