"""What every stage shares: its params section, its command line, atomic writes, counts.

One stage = one tasks/ module = one params.yaml section. A stage module defines
  - a frozen dataclass `Params` whose fields and defaults are that params.yaml section,
  - a pure core function taking inputs, output paths and `Params`,
  - `main(argv)` = `run_stage(...)`: parse paths from argv, read the section, call the core.
DVC calls `python -m tasks.<stage> ...`; Prefect tasks call the same core functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tasks.schema import QuarantineRecord

P = TypeVar("P")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # messages begin with their stage: "ingest: read 30, ..."


def stage_logger(stage: str) -> logging.Logger:
    """The stage's logger, under `tasks`: the one name the Prefect flow forwards to its run log."""
    return logging.getLogger(f"tasks.{stage}")


def show_stage_logs() -> None:
    """A command-line stage prints its own INFO lines on stderr (dvc repro shows them).

    Only the `tasks` loggers: libraries' INFO chatter (great-expectations logs hundreds of lines)
    stays at Python's default, warnings and up."""
    logger = logging.getLogger("tasks")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):  # one handler, however often called
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (as logging's last-resort handler does), not
    the stream of the moment it was made: a test harness or a caller may swap stderr in between."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class ParamsError(ValueError):
    """A params.yaml section that cannot run; the message names the setting to change."""


def params_from_dict(params_cls: type[P], section: str, values: dict[str, Any] | None) -> P:
    """Build a stage's Params from its params.yaml section, refusing unknown keys."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"params.yaml [{section}]: unknown key(s) {unknown}; known keys are {sorted(known)}")
    for name, value in values.items():  # YAML gives lists where frozen dataclasses want tuples
        if isinstance(value, list):
            values[name] = tuple(value)
    params = params_cls(**values)
    check = getattr(params, "check", None)
    if check is not None:
        check()  # each Params validates its own combinations and names the setting at fault
    return params


def load_params(params_cls: type[P], section: str, params_path: str | os.PathLike = "params.yaml") -> P:
    """Read one section of a params file into the stage's Params dataclass."""
    with open(params_path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    return params_from_dict(params_cls, section, document.get(section))


def load_section(section: str, params_path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    with open(params_path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    return dict(document.get(section) or {})


def run_stage(
    section: str,
    params_cls: type[P],
    paths: Iterable[tuple[str, str]],
    core: Callable[..., Any],
    argv: list[str] | None = None,
    extra_sections: Iterable[tuple[str, type]] = (),
) -> Any:
    """The shared command line: `--params FILE` plus one `--<name> PATH` per declared path.

    `paths` is (name, help) pairs; each becomes a required option and a keyword of `core`.
    `extra_sections` are other params sections the core reads (e.g. select reads score.method),
    passed as keywords named after the section.
    """
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{section}", description=core.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    for name, help_text in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, help=help_text)
    args = parser.parse_args(argv)
    show_stage_logs()
    kwargs: dict[str, Any] = {name: Path(getattr(args, name)) for name, _ in paths}
    kwargs["params"] = load_params(params_cls, section, args.params)
    for extra_section, extra_cls in extra_sections:
        kwargs[extra_section] = load_params(extra_cls, extra_section, args.params)
    return core(**kwargs)


# ---- atomic writes: a crash never leaves a half-written artifact under its final name ----------
def _umask_mode() -> int:
    """The mode a plain open() would give a new file: mkstemp's 0600 would hide shared artifacts."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _umask_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write a table atomically, with settings fixed so equal tables give equal bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp_name, compression="zstd", write_statistics=True, store_schema=True)
        os.chmod(tmp_name, _umask_mode())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# ---- counts and quarantine: read = kept + quarantined, always -----------------------------------
class StageLedger:
    """Counts what a stage read, kept and quarantined (by reason), and holds the quarantine.

    `write()` refuses to write stats where the books do not balance: nothing vanishes silently.
    stats.json holds every count and setting (bookkeeping); `metrics`, when a stage sets any, go to
    metrics.json beside it, the DVC metrics file: only the figures people compare across
    experiments, so `dvc metrics show` and `dvc exp show` stay readable.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.read = 0
        self.kept = 0
        self.quarantine: list[QuarantineRecord] = []
        self.extra: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}

    def count_read(self, n: int = 1) -> None:
        self.read += n

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def reject(self, reason: str, detail: str, *, id: str | None = None, source_row: int | None = None,
               record: str | None = None) -> None:
        self.quarantine.append(
            QuarantineRecord(stage=self.stage, reason=reason, detail=detail, id=id, source_row=source_row,
                             record=record)
        )

    @property
    def quarantined_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantine).items()))

    def stats(self) -> dict[str, Any]:
        by_reason = self.quarantined_by_reason
        stats = {
            "stage": self.stage,
            "read": self.read,
            "kept": self.kept,
            "quarantined": len(self.quarantine),
            **{f"quarantined_{reason}": n for reason, n in by_reason.items()},
            **self.extra,
        }
        return stats

    def check_balance(self) -> None:
        if self.read != self.kept + len(self.quarantine):
            raise RuntimeError(
                f"{self.stage}: counts do not reconcile: read {self.read} != kept {self.kept} "
                f"+ quarantined {len(self.quarantine)}"
            )

    def summary_line(self) -> str:
        """'ingest: read 30, kept 0, quarantined 30 (missing_field 30)': the counts a user checks first."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.quarantined_by_reason.items())
        return (f"{self.stage}: read {self.read}, kept {self.kept}, quarantined {len(self.quarantine)}"
                + (f" ({reasons})" if reasons else ""))

    def write_stats(self, stats_path: str | os.PathLike) -> dict[str, Any]:
        """stats.json (and metrics.json beside it), for a stage that writes no quarantine file."""
        self.check_balance()
        stats = self.stats()
        write_json(stats_path, stats)
        if self.metrics:
            write_json(Path(stats_path).with_name("metrics.json"), self.metrics)
        stage_logger(self.stage).info(self.summary_line())
        return stats

    def write(self, stats_path: str | os.PathLike, quarantine_path: str | os.PathLike) -> dict[str, Any]:
        self.check_balance()
        atomic_write_text(quarantine_path, "".join(q.to_json() + "\n" for q in self.quarantine))
        return self.write_stats(stats_path)
