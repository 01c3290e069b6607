"""Stage 4, extract: per-span losses and gradient-proxy Gram matrices of every trace (METHOD.md 3-4).

    python -m tasks.curate.extract --segments outputs/segment/segments.parquet --model outputs/model --out-dir outputs/extract

Traces, in segments order, are cut into shards of `shard_size`; each shard is one unit of work
(plan_shards -> extract_shard per shard, in process or on worker processes (tasks/curate/fanout.py:
every core by default) -> finalize). A finished shard is shards/part-NNNNN.parquet (EXTRACT_SCHEMA, segments order), its
part-NNNNN.quarantine.jsonl and, written last, a part-NNNNN.done marker holding the shard's
fingerprint (trace ids, trace keys) and the sha256 of both files. A rerun skips shards whose marker
matches, so a run killed at any moment finishes only what is missing, with the same bytes.

DVC deletes outs before it reruns a stage, so resume across `dvc repro` runs and reuse across
corpora rely on the per-trace cache (cache_dir, outside the DVC outs): a trace's key is the sha256 of
the model identity, the parameters that change its numbers (max_length, chat_template, head_variant,
device precision; with extract.projected on, the projected source's settings too, so every key of a
default run stays as it was) and the trace content (content_hash, scored_response, spans). Each computed shard
adds one pack file of results (quarantine outcomes included) named by its fingerprint: a few
thousand files for a million traces instead of a million tiny ones, written without contention by
parallel workers, found through an in-memory index of the packs' key columns that holds 12 bytes
per cached trace (PackCache). A cached
number was computed in the batch of its first run; batch composition moves only float rounding (so
shards run in parallel by Dask may compute a duplicated trace twice, equal up to that rounding).

Segments are streamed, never read whole: plan_shards and the shard reads go through the file a
record batch at a time, so memory holds a batch and a shard of rows, not the corpus. The plan keeps
a few numbers per shard (a shard's trace keys are computed again from its rows when it runs, and
checked against the shard's fingerprint), and the cache index 12 bytes per cached trace.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import pack_batches
from tasks.core.progress import Progress, show_progress
from tasks.core.schema import EXTRACT_SCHEMA, QuarantineRecord
from tasks.core.stage import (ParamsError, Stage, StageInputError, StageLedger, atomic_write_text, module_logger,
                              output_lock, params_section, remove_stale_staging, write_json, write_parquet)
from tasks.curate.fanout import map_units, worker_pool
from tasks.curate.projected import ProjectedModel, ProjectedSpec
from tasks.curate.proxy import ProxyModel, model_identity, precision, resolve_device
from tasks.curate.spans import EncodedTrace, SpanError, trace_spans
from tasks.curate.vlm import VLMProxyModel, is_vlm_dir

CACHE_VERSION = "extract-v2"  # v2: prompt_embedding. Bump when the meaning of the numbers extract writes changes
log = module_logger(__name__)
# Quarantines that depend on an image file's state now, not on the trace key (which holds the image's recorded
# sha256): never cached, so restoring the file brings the trace back
DISK_REASONS = ("image_missing", "image_changed", "image_unreadable")
SEGMENT_COLUMNS = ["id", "source_row", "content_hash", "prompt_messages", "scored_response", "step_starts",
                   "step_ends", "answer_start", "answer_end"]
KEY_COLUMNS = ["id", "content_hash", "scored_response", "step_starts", "step_ends", "answer_start", "answer_end"]
READ_BATCH_ROWS = 512  # segments rows decoded at a time: bounds the memory of reading, not its speed
NUMBER_COLUMNS = EXTRACT_SCHEMA.names[3:]  # span_token_counts ... prompt_embedding, projected_gram
# Pack columns that packs written before they existed lack; null is their value there: a cached trace
# with a projected Gram has extract.projected in its key, so a pack from before has none to give.
LATER_COLUMNS = ("projected_gram",)
PACK_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("reason", pa.string()),
                         pa.field("detail", pa.string())]
                        + [EXTRACT_SCHEMA.field(name).with_nullable(True) for name in NUMBER_COLUMNS])


@params_section("extract")
class Params:
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N
    batch_tokens: int = 8192  # padded tokens per forward batch: more = faster, more memory
    max_length: int | None = None  # null = the model's context length; longer traces lose prompt tokens first
    shard_size: int = 128  # traces per output shard: the unit of resume, caching and of work for the workers
    head_variant: bool = False  # also the exact LM-head Gram (METHOD.md 3, "head"): (n, n) and (n, V) per trace
    chat_template: bool = True  # wrap prompt and response in the tokenizer's chat template when it has one
    cache_dir: str | None = ".grace_cache/extract"  # per-trace results; null = off
    workers: int | str = "auto"  # auto = every core (GPU) memory allows; 0/1 = in process; N; gpus (tasks/curate/fanout.py)
    scheduler_address: str | None = None  # an existing Dask scheduler, e.g. tcp://10.0.0.5:8786: units go there
    projected: bool = False  # also the projected exact-gradient Gram (tasks/curate/projected.py): ~6x the time on CPU
    projection_dim: int | None = 32  # k per factor, k^2 numbers per layer: more = nearer exact, more memory; null = exact
    projection: str = "gaussian"  # gaussian | rademacher
    projected_target: str = "full"  # full (every parameter) | linear (the blocks' nn.Linear) | lora (LESS, dL/dB)
    projected_blocks: int | None = None  # null = every decoder block; N = the top N (the backward stops there)
    projection_seed: int = 0  # projections (and LoRA adapters)
    projected_lora_r: int = 8  # projected_target lora: adapter rank

    def check(self) -> None:
        for name in ("batch_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ParamsError(f"extract.{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ParamsError(f"extract.max_length must be null or at least 2, got {self.max_length}")
        if self.workers not in ("auto", "gpus") and (not isinstance(self.workers, int) or self.workers < 0):
            raise ParamsError(f"extract.workers must be auto, gpus, 0 or a positive integer, got {self.workers!r}")
        try:
            projected_spec(replace(self, projected=True)).check()  # checked even while off: a typo shows now
        except ValueError as error:
            raise ParamsError(f"extract.projected settings: {error}") from None


def projected_spec(params: Params) -> ProjectedSpec | None:
    """The projected source's settings, or None where extract.projected is off."""
    if not params.projected:
        return None
    return ProjectedSpec(params.projected_target, params.projected_blocks, params.projection_dim, params.projection,
                         params.projection_seed, params.projected_lora_r)


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: segments rows [start, stop), what their cache keys start with, the shard fingerprint."""

    index: int
    start: int
    stop: int
    key_head: str  # JSON [CACHE_VERSION, model identity, numeric params]: the start every trace key shares
    fingerprint: str  # sha256 of the shard's trace ids and keys
    device: str

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass(frozen=True)
class ShardRun:
    """What extract_shard did: the shard's path and run counters (not part of the output bytes)."""

    path: Path
    skipped: bool = False
    computed: int = 0  # traces encoded (and run through the model unless quarantined)
    cached: int = 0  # traces served by the cache
    real_tokens: int = 0  # tokens fed to the model
    padded_tokens: int = 0  # batch slots including right padding
    batches: int = 0
    seconds: float = 0.0  # model time: first launch to last result
    prepare_seconds: float = 0.0  # reading, cache lookup, tokenization


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_segment_batches(segments: Path | pa.Table, columns: list[str], start: int = 0) -> Iterator[pa.RecordBatch]:
    """Segments rows from `start` on, a record batch at a time; a file is read from the row group holding `start`."""
    if isinstance(segments, pa.Table):
        yield from segments.select(columns).slice(start).to_batches(max_chunksize=READ_BATCH_ROWS)
        return
    file = pq.ParquetFile(segments, buffer_size=1 << 16, pre_buffer=False)  # column chunks read in 64 KiB pieces
    group_ends = list(itertools.accumulate(file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)))
    first = bisect.bisect_right(group_ends, start)
    position = group_ends[first - 1] if first else 0  # row number of the next batch's first row
    for batch in file.iter_batches(READ_BATCH_ROWS, row_groups=range(first, file.num_row_groups), columns=columns):
        if position + batch.num_rows > start:
            yield batch.slice(max(start - position, 0))
        position += batch.num_rows


class SegmentReader:
    """Rows [start, stop) of the segments as dicts, read forward: shards asked for in order decode the file once.

    In process the shards come in order, on a Dask worker mostly so; a range behind the reader's
    place starts a new pass at the row group holding it.
    """

    def __init__(self, segments: Path | pa.Table) -> None:
        self.segments, self.lock = segments, threading.Lock()
        self._seek(0)

    def _seek(self, start: int) -> None:
        self.position = start  # row number of the next row self.stream yields
        self.stream = (row for batch in read_segment_batches(self.segments, SEGMENT_COLUMNS, start)
                       for row in batch.to_pylist())

    def rows(self, start: int, stop: int) -> list[dict]:
        with self.lock:
            if start < self.position:
                self._seek(start)
            rows = []
            for row in itertools.islice(self.stream, max(stop - self.position, 0)):
                if self.position >= start:
                    rows.append(row)
                self.position += 1
            return rows


@functools.lru_cache(maxsize=2)
def _file_reader(path: str, mtime_ns: int) -> SegmentReader:
    return SegmentReader(Path(path))


def segment_reader(segments: Path | pa.Table) -> SegmentReader:
    """The process's reader of a segments file (a Dask worker's next shard continues its pass), or of a table."""
    if isinstance(segments, pa.Table):
        return SegmentReader(segments)
    path = Path(segments).resolve()
    return _file_reader(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed_key_head(key_head: str) -> tuple:
    return tuple(json.loads(key_head))  # once per run, not once per trace; a tuple, so no caller can change it


def trace_key(key_head: str, row: dict) -> str:
    """A trace's cache key: model identity, the params that change its numbers (key_head), and its content."""
    return _sha256([*_parsed_key_head(key_head), row["content_hash"], row["scored_response"], trace_spans(
        row["step_starts"], row["step_ends"], row["answer_start"], row["answer_end"])])


def shard_fingerprint(ids: list[str], keys: list[str]) -> str:
    return _sha256([CACHE_VERSION, ids, keys])


def plan_shards(segments: Path | pa.Table, params: Params, model: Path) -> list[ShardSpec]:
    """Cut the segments into shards and fingerprint each by its traces' ids and keys, streaming."""
    device = resolve_device(params.device)
    numerics = {"max_length": params.max_length, "chat_template": params.chat_template,
                "head_variant": params.head_variant, "precision": precision(device)}
    if params.projected:  # only then: the keys of every existing cache stay as they are
        numerics["projected"] = asdict(projected_spec(params))
    key_head = json.dumps([CACHE_VERSION, model_identity(model), numerics])
    specs: list[ShardSpec] = []
    ids: list[str] = []
    keys: list[str] = []

    def close_shard() -> None:
        start = specs[-1].stop if specs else 0
        specs.append(ShardSpec(len(specs), start, start + len(ids), key_head, shard_fingerprint(ids, keys), device))
        ids.clear()
        keys.clear()

    for batch in read_segment_batches(segments, KEY_COLUMNS):
        for row in batch.to_pylist():
            ids.append(row["id"])
            keys.append(trace_key(key_head, row))
            if len(ids) == params.shard_size:
                close_shard()
    if ids:
        close_shard()
    return specs


def key_prefixes(keys: list[str]) -> np.ndarray:
    """(n,) uint64: the first 8 bytes of each hex sha256 key."""
    return np.frombuffer(bytes.fromhex("".join(key[:16] for key in keys)), dtype=">u8").astype(np.uint64)


class PackCache:
    """Per-trace results in pack files (one per computed shard), found through a compact index of their keys.

    The index holds, sorted, the first 8 bytes of every cached key (uint64) and the number of its
    pack (uint32): 12 bytes per cached trace, so a million cached traces cost 12 MB, not the ~200 MB
    of a dict of key strings. A prefix match is only a candidate: the pack is read and the full key
    compared. A key in several packs (a duplicate computed twice by parallel workers) is taken from
    the pack indexed first.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.packs: list[Path] = []  # pack number -> file, in the order they were indexed
        self.indexed: set[str] = set()
        self.prefixes = np.empty(0, dtype=np.uint64)  # (n,) sorted
        self.pack_numbers = np.empty(0, dtype=np.uint32)  # (n,) pack of each prefix
        self.lock = threading.Lock()  # the prefetch thread and the main thread both look up

    def _index_new_packs(self) -> None:
        for pack in sorted(self.root.glob("*.parquet")):
            if pack.name in self.indexed:
                continue
            self.indexed.add(pack.name)
            new = np.sort(key_prefixes(pq.read_table(pack, columns=["key"]).column("key").to_pylist()))  # (m,)
            # side="right" puts a prefix already indexed before the new one: earlier packs are found first
            at = np.searchsorted(self.prefixes, new, side="right")
            self.prefixes = np.insert(self.prefixes, at, new)
            self.pack_numbers = np.insert(self.pack_numbers, at, np.full(len(new), len(self.packs), np.uint32))
            self.packs.append(pack)

    def get(self, keys) -> dict[str, dict]:
        wanted = set(keys)
        if not wanted:
            return {}
        with self.lock:
            self._index_new_packs()
            prefixes = key_prefixes(sorted(wanted))  # (w,)
            low = np.searchsorted(self.prefixes, prefixes, side="left")
            high = np.searchsorted(self.prefixes, prefixes, side="right")
            candidates = sorted({int(n) for lo, hi in zip(low, high) for n in self.pack_numbers[lo:hi]})
            packs = [self.packs[n] for n in candidates]
        found: dict[str, dict] = {}
        for pack in packs:  # in indexing order, the first pack holding a key gives it
            for row in pq.read_table(pack).to_pylist():
                if row["key"] in wanted:
                    found.setdefault(row["key"], row)
        return found

    def put(self, name: str, rows: list[dict]) -> None:
        if rows:
            write_parquet(self.root / f"{name}.parquet", pa.Table.from_pylist(rows, schema=PACK_SCHEMA))


@functools.lru_cache(maxsize=4)
def _pack_cache(root: str) -> PackCache:
    return PackCache(Path(root))


def load_model(model: str, device: str, projected: ProjectedSpec | None = None) -> ProxyModel:
    """The model, loaded once per process (a worker keeps it across shards) and again when the directory holds
    another model (its identity: a long-lived remote worker must not score a rebuilt outputs/model with the old)."""
    try:
        identity = model_identity(Path(model))
    except FileNotFoundError:
        identity = None
    return _load_model(model, device, projected, identity)  # one cache key however the caller spells the default


@functools.lru_cache(maxsize=1)
def _load_model(model: str, device: str, projected: ProjectedSpec | None, identity: str | None) -> ProxyModel:
    if is_vlm_dir(Path(model)):  # a vision-language scorer (tasks/curate/vlm.py)
        if projected is not None:
            raise ParamsError("extract.projected: not available for a vision-language scorer; set it to false")
        return VLMProxyModel(Path(model), device)
    return ProxyModel(Path(model), device) if projected is None else ProjectedModel(Path(model), device, projected)


def _compute(model: ProxyModel, encoded: dict[int, EncodedTrace], params: Params, progress) -> tuple[dict, dict]:
    """Run the encoded traces in length-sorted batches, one batch in flight while the next is built."""
    order = list(encoded)
    batches = [[order[i] for i in batch] for batch in pack_batches([len(encoded[i].input_ids) for i in order],
                                                                   params.batch_tokens)]
    numbers, pending = {}, None
    counters = {"real_tokens": 0, "padded_tokens": 0, "batches": len(batches)}
    started = time.perf_counter()
    for batch in batches + [None]:
        launched = None
        if batch is not None:
            traces = [encoded[i] for i in batch]
            counters["real_tokens"] += sum(len(t.input_ids) for t in traces)
            counters["padded_tokens"] += len(traces) * len(traces[0].input_ids)
            launched = (batch, model.launch(traces, params.head_variant))
        if pending is not None:
            numbers.update(zip(pending[0], pending[1].collect()))
            if progress is not None:
                progress.update(len(pending[0]))
        pending = launched
    counters["seconds"] = time.perf_counter() - started
    return numbers, counters


def _number_row(trace: EncodedTrace, numbers) -> dict:
    return {"span_token_counts": trace.span_token_counts.tolist(), "span_loss_sums": numbers.span_loss_sums.tolist(),
            "proxy_gram": numbers.proxy_gram.ravel().tolist(),
            "head_gram": None if numbers.head_gram is None else numbers.head_gram.ravel().tolist(),
            "prompt_tokens": trace.prompt_tokens, "prompt_tokens_truncated": trace.prompt_tokens_truncated,
            "prompt_embedding": numbers.prompt_embedding.tolist(),
            "projected_gram": None if numbers.projected_gram is None else numbers.projected_gram.ravel().tolist()}


def _marker_ok(spec: ShardSpec, shards: Path) -> bool:
    marker = shards / f"{spec.name}.done"
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text(encoding="utf-8"))
    files = {"parquet_sha256": shards / f"{spec.name}.parquet",
             "quarantine_sha256": shards / f"{spec.name}.quarantine.jsonl"}
    return recorded.get("fingerprint") == spec.fingerprint and all(
        path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == recorded.get(name)
        for name, path in files.items())


@dataclass
class _Prepared:
    """A shard read, looked up in the cache and tokenized: everything before the model runs."""

    spec: ShardSpec
    skipped: bool
    rows: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # cache key of each row
    outcomes: dict[str, dict] = field(default_factory=dict)  # cache key -> pack row, cached traces only
    encodings: dict[int, EncodedTrace | SpanError] = field(default_factory=dict)  # row -> encoding, the others
    model: ProxyModel | None = None
    seconds: float = 0.0


def _prepare(spec: ShardSpec, reader: SegmentReader, model: Path, out_dir: Path, params: Params) -> _Prepared:
    if _marker_ok(spec, Path(out_dir) / "shards"):
        return _Prepared(spec, skipped=True)
    started = time.perf_counter()
    rows = reader.rows(spec.start, spec.stop)
    keys = [trace_key(spec.key_head, row) for row in rows]
    if shard_fingerprint([row["id"] for row in rows], keys) != spec.fingerprint:
        raise RuntimeError(f"extract: rows {spec.start}-{spec.stop} of the segments changed since the plan was made "
                           f"({spec.name}); plan again")
    outcomes = _pack_cache(params.cache_dir).get(keys) if params.cache_dir else {}
    missing = [i for i, key in enumerate(keys) if key not in outcomes]
    if not missing:
        return _Prepared(spec, False, rows, keys, outcomes, seconds=time.perf_counter() - started)
    proxy_model = load_model(str(model), spec.device, projected_spec(params))  # once per process; not preparation
    looked_up, started = time.perf_counter() - started, time.perf_counter()
    encodings = proxy_model.encode([
        (rows[i]["prompt_messages"], rows[i]["scored_response"],
         trace_spans(rows[i]["step_starts"], rows[i]["step_ends"], rows[i]["answer_start"], rows[i]["answer_end"]))
        for i in missing], chat_template=params.chat_template,
        max_length=params.max_length or proxy_model.context_length)
    return _Prepared(spec, False, rows, keys, outcomes, dict(zip(missing, encodings)), proxy_model,
                     looked_up + time.perf_counter() - started)


def _finish(prepared: _Prepared, out_dir: Path, params: Params, progress: Progress | None) -> ShardRun:
    """Run the model on what the cache lacked, then write the shard, its quarantine, cache pack and marker."""
    spec, keys, shards = prepared.spec, prepared.keys, Path(out_dir) / "shards"
    path = shards / f"{spec.name}.parquet"
    if prepared.skipped:
        if progress is not None:
            progress.update(spec.stop - spec.start)
        return ShardRun(path, skipped=True)
    if params.cache_dir and prepared.encodings:
        # Look again now that every earlier shard is written: a duplicate of a trace computed there is
        # then always taken from it, whatever the prefetch timing, so the bytes do not depend on it.
        late = _pack_cache(params.cache_dir).get([keys[i] for i in prepared.encodings])
        prepared.outcomes.update(late)
        prepared.encodings = {i: e for i, e in prepared.encodings.items() if keys[i] not in late}
    encoded = {i: e for i, e in prepared.encodings.items() if isinstance(e, EncodedTrace)}
    if progress is not None:
        progress.update(spec.stop - spec.start - len(encoded))  # the model's traces count as their batches end
    numbers, counters = _compute(prepared.model, encoded, params, progress) if encoded else ({}, {})
    outcomes, fresh = prepared.outcomes, []
    for i, encoding in prepared.encodings.items():
        outcome = {"key": keys[i], "reason": None, "detail": None}
        if isinstance(encoding, SpanError):
            outcome.update(reason=encoding.reason, detail=encoding.detail)
        else:
            outcome.update(_number_row(encoding, numbers[i]))
        if outcome["reason"] not in DISK_REASONS:
            fresh.append(outcome)
        outcomes[keys[i]] = outcome
    if params.cache_dir:
        _pack_cache(params.cache_dir).put(spec.fingerprint, fresh)
    kept, quarantine = [], []
    for row, key in zip(prepared.rows, keys):
        outcome = outcomes[key]
        if outcome["reason"] is None:
            kept.append({"id": row["id"], "content_hash": row["content_hash"], "n_steps": len(row["step_starts"]),
                         **{name: outcome[name] for name in NUMBER_COLUMNS if name not in LATER_COLUMNS},
                         **{name: outcome.get(name) for name in LATER_COLUMNS}})
        else:
            quarantine.append(QuarantineRecord("extract", outcome["reason"], outcome["detail"], id=row["id"],
                                               source_row=row["source_row"], record=row["scored_response"]))
    quarantine_path = shards / f"{spec.name}.quarantine.jsonl"
    for summary in ("stats.json", "quarantine.jsonl"):  # an earlier run's summary must not pass for this one's
        (Path(out_dir) / summary).unlink(missing_ok=True)
    write_parquet(path, pa.Table.from_pylist(kept, schema=EXTRACT_SCHEMA))
    atomic_write_text(quarantine_path, "".join(q.to_json() + "\n" for q in quarantine))
    write_json(shards / f"{spec.name}.done", {  # last: its presence means the shard is complete
        "fingerprint": spec.fingerprint, "read": len(prepared.rows), "kept": len(kept),
        "loss_tokens": sum(sum(row["span_token_counts"]) for row in kept),
        "prompt_tokens_truncated": sum(row["prompt_tokens_truncated"] for row in kept),
        "parquet_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "quarantine_sha256": hashlib.sha256(quarantine_path.read_bytes()).hexdigest()})
    return ShardRun(path, computed=len(prepared.encodings), cached=len(prepared.rows) - len(prepared.encodings),
                    prepare_seconds=prepared.seconds, **counters)


def extract_shard(spec: ShardSpec, segments: Path | pa.Table, model: Path, out_dir: Path, params: Params,
                  progress: Progress | None = None) -> ShardRun:
    """Compute (or take from the cache) one shard and write it with its marker; skip it if already done."""
    return _finish(_prepare(spec, segment_reader(segments), model, out_dir, params), out_dir, params, progress)


def finalize(out_dir: Path, specs: list[ShardSpec], runs: list[ShardRun], workers: int = 1) -> dict:
    """Check every shard is done, drop stale files, merge quarantines, write stats.json (read = kept + quarantined)."""
    out_dir = Path(out_dir)
    shards = out_dir / "shards"
    unfinished = [spec.name for spec in specs if not _marker_ok(spec, shards)]
    if unfinished:
        raise RuntimeError(f"extract: shard(s) {unfinished} missing or stale; run extract_shard for them")
    planned = {spec.name for spec in specs}
    for stale in shards.glob("*part-*"):
        if stale.name.startswith(".") or stale.name.split(".")[0] not in planned:
            stale.unlink()  # an interrupted write's temp file, or a shard of an earlier, longer plan
    # a killed run's temp copies of the summaries (finalize runs only under extract's output lock)
    remove_stale_staging(out_dir, ["stats.json", "quarantine.jsonl", "metrics.json"])
    ledger = StageLedger("extract")
    totals = {"loss_tokens": 0, "prompt_tokens_truncated": 0}
    for spec in specs:
        marker = json.loads((shards / f"{spec.name}.done").read_text(encoding="utf-8"))
        ledger.count_read(marker["read"])
        ledger.keep(marker["kept"])
        for name in totals:
            totals[name] += marker[name]
        # split at "\n" only: a quarantined response may hold U+2028 or \x0c, which splitlines() splits at
        lines = (shards / f"{spec.name}.quarantine.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
        ledger.quarantine.extend(QuarantineRecord(**json.loads(line)) for line in lines)
    ledger.require_kept(shards)
    real, padded = sum(r.real_tokens for r in runs), sum(r.padded_tokens for r in runs)
    seconds, prepare_seconds = sum(r.seconds for r in runs), sum(r.prepare_seconds for r in runs)
    ledger.extra.update(
        totals, shards=len(specs), shards_skipped=sum(r.skipped for r in runs),
        traces_computed=sum(r.computed for r in runs), traces_cached=sum(r.cached for r in runs),
        forward_batches=sum(r.batches for r in runs), device=specs[0].device if specs else None, workers=workers,
        padding_waste=round(1 - real / padded, 4) if padded else None,
        tokens_per_s=round(real / seconds, 1) if real and seconds else None, model_seconds=round(seconds, 3),
        prepare_seconds=round(prepare_seconds, 3))
    # Timings (model_seconds, tokens_per_s) stay in stats.json: in metrics.json every cross-machine
    # `dvc metrics diff` / `dvc exp show` would show them changed.
    ledger.metrics.update(loss_tokens=ledger.extra["loss_tokens"])
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


def extract(segments: Path, model: Path, out_dir: Path, params: Params) -> dict:
    """Per-span losses and proxy Grams of every segmented trace: shards/, quarantine.jsonl, stats.json."""
    with output_lock(out_dir):  # one writer per folder: shards of two runs must never mix
        return _extract(segments, model, out_dir, params)


def _extract(segments: Path, model: Path, out_dir: Path, params: Params) -> dict:
    specs = plan_shards(segments, params, model)
    if not specs:
        raise StageInputError(f"extract: {segments} holds no traces")
    with show_progress("extract", specs[-1].stop, "trace", log) as progress, worker_pool(
            "extract", params.workers, params.scheduler_address, params.device, len(specs), specs[-1].stop,
            model) as client:
        if client is None:
            runs = _extract_in_process(specs, segments, model, out_dir, params, progress)
        else:  # the same extract_shard per shard, on the workers; paths they can open wherever they run
            runs = map_units(client, extract_shard, specs, progress, absolute(segments), Path(model).resolve(),
                             Path(out_dir).resolve(), replace(params, cache_dir=params.cache_dir and str(
                                 Path(params.cache_dir).resolve())))
        workers = len(client.nthreads()) if client is not None else 1
    return finalize(out_dir, specs, runs, workers)


def absolute(segments: Path | pa.Table) -> Path | pa.Table:
    return segments if isinstance(segments, pa.Table) else Path(segments).resolve()


def _extract_in_process(specs: list[ShardSpec], segments: Path | pa.Table, model: Path, out_dir: Path,
                        params: Params, progress: Progress) -> list[ShardRun]:
    with ThreadPoolExecutor(max_workers=1) as prefetch:
        # the next shard (only: memory stays bounded) is read and tokenized while the model works on this one
        prepare = functools.partial(_prepare, reader=segment_reader(segments), model=model, out_dir=out_dir,
                                    params=params)
        upcoming, runs = prefetch.submit(prepare, specs[0]), []
        for following in specs[1:] + [None]:
            prepared = upcoming.result()
            upcoming = prefetch.submit(prepare, following) if following else None
            runs.append(_finish(prepared, out_dir, params, progress))
    return runs


STAGE = Stage(extract, Params, paths=[
    ("segments", "segments.parquet from the segment stage"),
    ("model", "model directory from the model stage"),
    ("out_dir", "output directory (shards/, quarantine.jsonl, stats.json)"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    # Run the importable tasks.curate.extract, not this __main__ copy: what goes to Dask workers (the shard
    # function, its params and specs) is pickled by module name, and a remote worker has no __main__ of ours.
    import importlib

    importlib.import_module("tasks.curate.extract").main()
