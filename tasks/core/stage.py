"""What every stage shares: its params section, its command line, atomic writes, counts.

One stage = one module of a tasks/ package (tasks/__init__.py) = one params.yaml section. A stage module defines
  - `@params_section("<section>") class Params`: fields and defaults are that params.yaml section,
    typed (pydantic, strict: `big` is no integer, `"false"` no boolean); the decorator is all a new
    section needs, since the sections params.yaml may hold are read off these decorators,
  - a pure core function taking inputs, output paths and `Params`,
  - `STAGE = Stage(core, Params, paths=[...], extra_sections=[...])`: the stage declared once, its
    paths and the other sections it reads; `main(argv)` = `STAGE.main(argv)` parses the paths from
    argv, reads the sections and calls the core.
DVC calls `python -m tasks.<package>.<stage> ...`; the Prefect flow's tasks call `STAGE.run(params, **paths)`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import types
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import yaml

from tasks.core.schema import QuarantineRecord

P = TypeVar("P")
# perf_counter at the start of the running Stage.run: a ledger's `seconds` count from there, not
# from wherever the core made its ledger (extract makes it in finalize, after the model work)
STAGE_STARTED: contextvars.ContextVar[float | None] = contextvars.ContextVar("stage_started", default=None)
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"  # messages begin with their stage: "ingest: read 30, ..."


def stage_logger(stage: str) -> logging.Logger:
    """The stage's logger, under `tasks`: the one name the Prefect flow forwards to its run log."""
    return logging.getLogger(f"tasks.{stage}")


def module_logger(name: str) -> logging.Logger:
    """`logging.getLogger(__name__)` that survives `python -m`: run that way (as dvc.yaml does) a module's
    __name__ is "__main__", a logger outside `tasks` whose lines (extract's progress) went nowhere."""
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else name
    return logging.getLogger(name)


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


class StageInputError(ValueError):
    """An input a stage cannot run on (unreadable, or nothing in it to keep); the message names path and reason."""


class OutputLocked(StageInputError):
    """Another run holds the lock of the stage output this one would write; the message names that run."""


# strict: no coercion of "5" to 5 or "no" to True; forbid: an unknown key is an error; finite floats only
PARAMS_CONFIG = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def params_section(section: str) -> Callable[[type[P]], type[P]]:
    """Make a class a stage's Params: a frozen, strictly typed dataclass for params.yaml's `section`."""

    def declare(cls: type[P]) -> type[P]:
        cls.section = section
        return pydantic.dataclasses.dataclass(frozen=True, config=PARAMS_CONFIG)(cls)

    return declare


@functools.lru_cache(maxsize=1)
def known_sections() -> frozenset[str]:
    """Every section named by a `@params_section("...")` in the tasks package, read from source, not imported.

    Parsing instead of importing keeps torch out of stages that need none; a new stage module is
    known as soon as it declares its Params.
    """
    sections = set()
    for path in Path(__file__).parents[1].rglob("*.py"):  # the whole tasks package
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == params_section.__name__:
                sections.update(arg.value for arg in node.args if isinstance(arg, ast.Constant))
    return frozenset(sections)


def _type_name(annotation: Any) -> str:
    """int | None -> "an integer or null"; tuple[float, ...] -> "a list (each item a number)"."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is tuple:
        return f"a list (each item {_type_name(typing.get_args(annotation)[0])})"
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _type_errors(params_cls: type, section: str, error: pydantic.ValidationError) -> str:
    """One entry per wrong setting: its name (and item), the value given and the type it needs."""
    hints = typing.get_type_hints(params_cls)
    problems = {}
    for item in error.errors(include_url=False):
        name = str(item["loc"][0]) if item["loc"] else "?"
        where = section + "." + name + "".join(f"[{i}]" for i in item["loc"][1:] if isinstance(i, int))
        if name in problems:
            continue
        if item["type"] == "finite_number":
            problems[name] = f"{where} = {item['input']!r}: expected a finite number"
        elif name in hints:
            problems[name] = f"{where} = {item['input']!r}: expected {_type_name(hints[name])}"
        else:
            problems[name] = f"{where}: {item['msg']}"
    return f"params.yaml [{section}]: " + "; ".join(problems.values())


def params_from_dict(params_cls: type[P], section: str, values: dict[str, Any] | None) -> P:
    """Build a stage's Params from its params.yaml section, refusing unknown keys and wrong types."""
    if values is not None and not isinstance(values, dict):
        raise ParamsError(f"params.yaml [{section}]: expected a mapping of settings, got {values!r}")
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ParamsError(f"params.yaml [{section}]: unknown key(s) {unknown}; known keys are {sorted(known)}")
    for name, value in values.items():  # YAML gives lists where frozen dataclasses want tuples
        if isinstance(value, list):
            values[name] = tuple(value)
    try:
        params = params_cls(**values)
    except pydantic.ValidationError as error:
        raise ParamsError(_type_errors(params_cls, section, error)) from None
    check = getattr(params, "check", None)
    if check is not None:
        check()  # each Params validates its own ranges and combinations and names the setting at fault
    return params


def read_params_document(params_path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """The whole params file, refusing a top-level section no stage declares (a misspelt `segmnet:`)."""
    with open(params_path, encoding="utf-8") as handle:
        document = yaml.safe_load(handle) or {}
    if not isinstance(document, dict):
        raise ParamsError(f"{params_path}: expected a mapping of sections, got {type(document).__name__}")
    unknown = sorted(set(document) - known_sections())
    if unknown:
        raise ParamsError(f"{params_path}: unknown section(s) {unknown}; known sections are {sorted(known_sections())}")
    return document


def load_params(params_cls: type[P], section: str, params_path: str | os.PathLike = "params.yaml") -> P:
    """Read one section of a params file into the stage's Params dataclass."""
    return params_from_dict(params_cls, section, read_params_document(params_path).get(section))


def module_name(function: Callable[..., Any]) -> str:
    """The dotted module a function is defined in, also when that module runs as `python -m` (`__main__`)."""
    name = function.__module__
    if name == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else name
    return name


PathSpec = tuple[str, str]  # (name, help): a `--name PATH` option and the core's keyword `name`


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage, declared once in its module and read by its command line, the Prefect flow and tests:

        STAGE = Stage(core, Params, paths=[("extract", "..."), ("out_dir", "...")],
                      optional_paths=[("unconditional", "...")], extra_sections=[("score", score.Params)])

    `core` is the pure function; it takes one keyword per path, `params` (its own section, the one
    `Params` declares) and one keyword per extra section, named after the section. A path in
    `optional_paths` may be left out (the core gets None).
    """

    core: Callable[..., Any]
    params: type
    paths: tuple[PathSpec, ...] = ()
    optional_paths: tuple[PathSpec, ...] = ()
    extra_sections: tuple[tuple[str, type], ...] = ()

    def __post_init__(self) -> None:  # lists in the declaration, tuples in the frozen object
        for name in ("paths", "optional_paths", "extra_sections"):
            object.__setattr__(self, name, tuple(tuple(item) for item in getattr(self, name)))

    @property
    def section(self) -> str:
        return self.params.section

    @property
    def path_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.paths + self.optional_paths)

    def read_params(self, params_path: str | os.PathLike = "params.yaml") -> Any:
        """The stage's own Params, read from its section of the params file."""
        return load_params(self.params, self.section, params_path)

    def settings(self, params_path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
        """The core's params keywords: `params` and one per extra section."""
        kwargs: dict[str, Any] = {"params": self.read_params(params_path)}
        for extra_section, extra_cls in self.extra_sections:
            kwargs[extra_section] = load_params(extra_cls, extra_section, params_path)
        return kwargs

    def run(self, params_path: str | os.PathLike, **paths: str | os.PathLike | None) -> Any:
        """The core on these paths with the settings of params_path (what a Prefect task calls)."""
        unknown = sorted(set(paths) - set(self.path_names))
        if unknown:
            raise TypeError(f"{module_name(self.core)}: no path(s) {unknown}; it takes {list(self.path_names)}")
        given = {name: None if value is None else Path(value) for name, value in paths.items()}
        started = STAGE_STARTED.set(time.perf_counter())
        try:
            return self.core(**given, **self.settings(params_path))
        finally:
            STAGE_STARTED.reset(started)

    def main(self, argv: list[str] | None = None) -> Any:
        """The shared command line: `--params FILE` plus one `--<name> PATH` per declared path."""
        parser = argparse.ArgumentParser(prog=f"python -m {module_name(self.core)}", description=self.core.__doc__)
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        for name, help_text in self.paths:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, help=help_text)
        for name, help_text in self.optional_paths:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{help_text} (optional)")
        args = parser.parse_args(argv)
        show_stage_logs()
        try:
            return self.run(args.params, **{name: getattr(args, name) for name in self.path_names})
        except (ParamsError, StageInputError, OSError) as error:  # the user's to fix: one line, not a traceback
            parser.exit(2, f"{parser.prog}: error: {error}\n")


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


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Be the one writer of `out_dir` while inside: an exclusive flock on `<parent>/.<name>.lock`.

    A second writer (another dvc repro, flow or shell on the same folder) stops at once with OutputLocked,
    one line naming the holder, instead of both writing into one folder (mixed shards, a stats.json that
    counts another run's files). The kernel drops an flock when its process dies, kill -9 included, so a
    crash never leaves a stale lock (only the file, which the next holder takes over). The holder removes
    the file when it is done; a writer that locked a file just removed sees its inode gone and tries again.
    """
    import fcntl

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OutputLocked(f"{out_dir} is being written by {holder}; wait for it to finish or stop it "
                               "(two writers would mix their files)") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break  # the file at `path` is the one locked
        handle.close()  # locked a file its holder had just removed
    try:
        handle.seek(0)
        handle.truncate()
        command = " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:160]
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one takes over a file about to vanish
        handle.close()


def _staging_pattern(name: str) -> re.Pattern:
    """The names tempfile gives a staging copy of `name`: `.<name>.` + 8 random characters + `.tmp`."""
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_staging(directory: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove what killed writes left in `directory`: for each of `names`, its atomic_outputs staging
    directories and its atomic_write temp files (`.<name>.XXXXXXXX.tmp`). A live writer's staging looks
    the same, so only the holder of the output's lock (output_lock) may call this. Returns what it removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [_staging_pattern(name) for name in names]
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") and any(p.fullmatch(entry.name) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)


def atomic_outputs(core: Callable[..., Any]) -> Callable[..., Any]:
    """Make a stage's `out_dir` appear whole or not at all: `core` writes into a fresh directory of
    the same name beside it, which replaces out_dir only once `core` has returned.

    A crash or a full disk midway leaves the earlier out_dir as it was (or, in the instant between
    the two renames, no out_dir), never new files next to old ones. The run holds out_dir's lock
    (output_lock) throughout, and first removes the staging directories killed runs left beside it.
    """
    signature = inspect.signature(core)

    @functools.wraps(core)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        out_dir = Path(bound.arguments["out_dir"])
        with output_lock(out_dir):
            remove_stale_staging(out_dir.parent, [out_dir.name])
            prefix, suffix = _staging_affixes(out_dir.name)
            staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=prefix, suffix=suffix))
            try:
                bound.arguments["out_dir"] = work = staging / out_dir.name  # the same name, for code that reads it
                work.mkdir()
                result = core(*bound.args, **bound.kwargs)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(out_dir, staging / ".replaced")  # a directory cannot be renamed onto a full one
                os.replace(work, out_dir)
                return result
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    return run


def _staging_affixes(name: str) -> tuple[str, str]:
    """The prefix and suffix of atomic_outputs' staging directory for an out_dir called `name`."""
    return f".{name}.", ".tmp"


def published_dir(out_dir: str | os.PathLike) -> Path:
    """The directory `out_dir` becomes once atomic_outputs publishes it: a path recorded inside an output
    (an embedded image's file) must name that one, not the staging copy the core writes into."""
    out_dir = Path(out_dir)
    staging = out_dir.parent
    prefix, suffix = _staging_affixes(out_dir.name)
    if staging.name.startswith(prefix) and staging.name.endswith(suffix):
        return staging.parent / out_dir.name
    return out_dir


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
        self.started = STAGE_STARTED.get() or time.perf_counter()  # the stage's start, where Stage.run set it

    @property
    def seconds(self) -> float:
        # milliseconds: a stage on a small pool (segment, select) takes tens of them, and tenths said 0.0
        return round(time.perf_counter() - self.started, 3)

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
            "seconds": self.seconds,  # wall time of the stage so far: a run counter, not a result
        }
        return stats

    def require_kept(self, source: str | os.PathLike, hint: str = "") -> None:
        """Stop the run at this stage when it kept nothing: every later stage could only fail less clearly."""
        if self.kept:
            return
        if not self.read:
            raise StageInputError(f"{self.stage}: {source} holds no records{hint}")
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.quarantined_by_reason.items())
        example = f"; first: {self.quarantine[0].detail}" if self.quarantine else ""
        raise StageInputError(f"{self.stage}: kept none of the {self.read} records of {source} "
                              f"(quarantined {reasons}{example}){hint}")

    def check_balance(self) -> None:
        if self.read != self.kept + len(self.quarantine):
            raise RuntimeError(
                f"{self.stage}: counts do not reconcile: read {self.read} != kept {self.kept} "
                f"+ quarantined {len(self.quarantine)}"
            )

    def summary_line(self) -> str:
        """'ingest: read 30, kept 0, quarantined 30 (missing_field 30) in 0.2 s': the counts a user checks
        first, and how long the stage took."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.quarantined_by_reason.items())
        return (f"{self.stage}: read {self.read}, kept {self.kept}, quarantined {len(self.quarantine)}"
                + (f" ({reasons})" if reasons else "") + f" in {self.seconds:.1f} s")

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
        atomic_write_text(quarantine_path, quarantine_text(self.quarantine))
        return self.write_stats(stats_path)


def quarantine_text(records: Iterable[QuarantineRecord]) -> str:
    """A quarantine.jsonl's text: one record a line; no record = one blank line, never zero bytes.

    A zero-byte file is what DVC warns about ("'outputs/export/quarantine.jsonl' is empty.") on every
    `dvc repro` that writes or reads it, so a clean run printed several warnings that meant nothing. A
    blank line is no record to JSONL readers (NDJSON lets parsers skip empty lines; pandas, pyarrow and
    jq read it as zero rows; `read_quarantine` does).
    """
    return "".join(q.to_json() + "\n" for q in records) or "\n"


def read_quarantine(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a quarantine.jsonl, blank lines skipped."""
    # split at "\n" only: a quarantined response may hold U+2028 or \x0c, which splitlines() splits at
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
