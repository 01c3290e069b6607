"""Input formats of the ingest stage: a stream of (source_row, record) with `read` counted.

- jsonl: read as bytes line by line and decoded strictly as UTF-8, so one bad line costs one record
  (undecodable_bytes, malformed_json, not_object, and unpaired_surrogate for a valid JSON escape
  like "\\ud800" that no UTF-8 file can hold, go to the ledger); blank lines are skipped and
  counted as `blank_lines`, not as read. source_row = 0-based line number (blank lines included).
- json: one JSON array of objects (Alpaca's alpaca.json, export's own output), parsed whole;
  source_row = 0-based index in the array; an element that is not an object is quarantined
  (not_object). A file that is not a JSON array is an error naming what it holds. With format auto
  a .json file is read as json when its first non-blank character is "[", else as JSON Lines (many
  hubs ship JSON Lines under .json).
- jsonl and json files may be gzip- or zstandard-compressed (`.jsonl.gz`, `.json.zst`; told by their
  first bytes, whatever the name): gzip always, zstandard where the `zstandard` package is installed.
- parquet: row batches of a Parquet file; hf_disk: a `datasets.save_to_disk` directory; hub: a dataset
  id (or a local dataset directory or script) read by `datasets.load_dataset`, chosen by auto for a
  path that does not exist and looks like `owner/name`. A DatasetDict (several splits) is read at
  `ingest.split`; null reads the only split. source_row = 0-based row index.
Only one batch of rows is ever decoded to Python objects at a time. An input that is missing, not
Parquet, or a directory that is not a saved dataset is a StageInputError naming the path.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.stage import ParamsError, StageInputError, StageLedger

BATCH_ROWS = 4096  # Parquet / Arrow rows decoded to Python at a time
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a line only holds a lone surrogate where this matches
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hugging Face Hub spells a dataset


def _open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, decompressed when it starts as gzip or zstandard does (any name)."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if magic == ZSTD_MAGIC:
        try:
            import zstandard  # optional: not a dependency of the project
        except ImportError:
            raise StageInputError(f"{path}: zstandard-compressed, and the zstandard package is not installed: "
                                  f"`pip install zstandard`, or decompress it (zstd -d)") from None
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)  # lines: the stream reader itself has no readline
    return open(path, "rb")


def _inner_suffix(path: Path) -> str:
    """.jsonl of data.jsonl and of data.jsonl.gz / data.jsonl.zst."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _unpaired_surrogate(text: str, record: dict) -> str | None:
    """Why `record` (parsed from `text`) cannot be written as UTF-8, or None; cheap unless an escape is there."""
    if not SURROGATE_ESCAPE.search(text):
        return None
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        found = err.object[err.start:err.end]
        return f"an unpaired surrogate escape {found!r}: valid JSON, but no UTF-8 text can hold it"
    return None  # a surrogate pair escaped as two \\u escapes, or an escaped backslash before "ud8..."


def _jsonl_records(path: Path, ledger: StageLedger) -> Iterator[tuple[int, dict]]:
    """(0-based line number, record); each line is decoded on its own so one bad line costs one record."""
    with _open_bytes(path) as handle:
        for row, line in enumerate(handle):
            if row == 0:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                ledger.extra["blank_lines"] += 1
                continue
            ledger.count_read()
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                as_text = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
                ledger.reject("undecodable_bytes", f"not UTF-8: {err}", source_row=row, record=as_text)
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as err:
                ledger.reject("malformed_json", f"not JSON: {err}", source_row=row, record=text.rstrip("\r\n"))
                continue
            if not isinstance(record, dict):
                ledger.reject("not_object", f"a JSON {type(record).__name__}, not an object", source_row=row,
                              record=text.rstrip("\r\n"))
                continue
            surrogate = _unpaired_surrogate(text, record)
            if surrogate is not None:
                ledger.reject("unpaired_surrogate", surrogate, source_row=row, record=text.rstrip("\r\n"))
                continue
            yield row, record


def _json_array_records(path: Path, ledger: StageLedger) -> Iterator[tuple[int, dict]]:
    try:
        with _open_bytes(path) as handle:
            document = json.loads(handle.read().removeprefix(codecs.BOM_UTF8).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: not a JSON document ({err}); for JSON Lines set ingest.format: jsonl") from err
    if not isinstance(document, list):
        held = f"an object with keys {sorted(document)[:10]}" if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"{path}: ingest.format json needs a JSON array of records, the file holds {held}")
    for row, record in enumerate(document):
        ledger.count_read()
        if not isinstance(record, dict):
            ledger.reject("not_object", f"a JSON {type(record).__name__}, not an object", source_row=row,
                          record=json.dumps(record, ensure_ascii=False))
            continue
        yield row, record


def _first_character(path: Path) -> bytes:
    with _open_bytes(path) as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head[:1]


def _arrow_records(batches: Iterator[pa.RecordBatch | pa.Table], ledger: StageLedger) -> Iterator[tuple[int, dict]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            ledger.count_read()
            yield row, record
            row += 1


def _hf_batches(path: Path, split: str | None, hub: bool = False) -> Iterator[pa.Table]:
    import datasets  # heavy import, only for these formats

    try:
        dataset = datasets.load_dataset(str(path)) if hub else datasets.load_from_disk(str(path))
    except FileNotFoundError as err:  # datasets' own word for a directory or id it does not recognise
        what = ("not a dataset id or directory datasets.load_dataset can read" if hub else
                "a directory, but not a dataset saved by datasets' save_to_disk")
        raise StageInputError(f"{path}: {what} ({err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split is None and len(dataset) == 1:
            split = next(iter(dataset))
        if split not in dataset:
            given = "ingest.split is null" if split is None else f"it has no split {split!r}"
            raise ParamsError(f"ingest.split: {path} holds splits {list(dataset)} and {given}; set ingest.split "
                              "to one of them")
        dataset = dataset[split]
    elif split is not None:
        raise ParamsError(f"ingest.split: {path} is one dataset without splits; set ingest.split: null")
    return dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)


def read_records(path: Path, fmt: str, ledger: StageLedger, split: str | None = None) -> Iterator[tuple[int, dict]]:
    """(source_row, record) for every JSON object of the input, in input order; see the module doc."""
    ledger.extra["blank_lines"] = 0  # only JSONL has any; the key is there for every format
    if fmt == "hub" or (fmt == "auto" and not path.exists() and HUB_ID.fullmatch(path.as_posix())):
        return _arrow_records(_hf_batches(path, split, hub=True), ledger)
    if not path.exists():
        raise StageInputError(f"ingest input {path} does not exist")
    if fmt == "auto":
        suffixes = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
        fmt = "hf_disk" if path.is_dir() else suffixes.get(_inner_suffix(path), "")
        if fmt == "json" and _first_character(path) != b"[":
            fmt = "jsonl"
        if not fmt:
            raise ParamsError(f"ingest.format: cannot tell the format of {path}; set jsonl, json, parquet or hf_disk")
    if fmt == "jsonl":
        return _jsonl_records(path, ledger)
    if fmt == "json":
        return _json_array_records(path, ledger)
    if fmt == "parquet":
        try:
            file = pq.ParquetFile(path)
        except (pa.ArrowInvalid, IsADirectoryError) as err:
            raise StageInputError(f"{path}: not a Parquet file ({err})") from None
        return _arrow_records(file.iter_batches(batch_size=BATCH_ROWS), ledger)
    return _arrow_records(_hf_batches(path, split), ledger)
