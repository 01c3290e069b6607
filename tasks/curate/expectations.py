"""The expectation suites `validate` runs: one table and its great-expectations expectations each.

A suite's table is an artifact as written, or a small table derived from several artifacts so the
cross-stage checks (schemas, counts reconciling, subsets, ids upstream) show in Data Docs as well.
Artifacts are read from their files directly (extract shard by shard), not through each stage's
own reader, so a reader that casts or repairs cannot hide what is on disk.

What is cheap to recompute is recomputed with the stages' own code, so an edited number shows even
where every count agrees (issue 22): content hashes (schema.content_hash), span bounds (every span inside its
scored response), step scores from alpha and consistency (score's lambda_), sample scores from step scores
(aggregate's rule, score.method grace), the ranking's scores, and each subset from select's whole rule
(select.choose: max_per_question, stratify_by and within_clusters included, as the manifest records them).
An artifact that cannot be read raises ArtifactUnreadable, which validate writes as a failed result.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.schema import (CLUSTER_SCHEMA, EXTRACT_SCHEMA, RANKING_SCHEMA, SAMPLE_SCORE_SCHEMA, SEGMENT_SCHEMA,
                               STEP_SCORE_SCHEMA, TRACE_SCHEMA, content_hash)
from tasks.curate import select as select_stage
from tasks.curate.aggregate import grace_sample_scores

# score clips cosines to [-1, 1], but lambda*alpha + (1-lambda)*c may still round a hair past 1.
COSINE_TOLERANCE = 1e-9
# a recomputed score against the stored one: the same float64 operations give the same bits; the slack only
# absorbs summation order, far below any edit that could move a rank
RECOMPUTE_TOLERANCE = 1e-9
STAGES_WITH_STATS = ("ingest", "segment", "extract", "score", "cluster", "aggregate")
STAGES_WITH_QUARANTINE = ("ingest", "segment", "extract")
# (suite name, file under outputs/, schema, key columns that are unique per row)
ARTIFACTS = (
    ("ingest_traces", "ingest/traces.parquet", TRACE_SCHEMA, ["id"]),
    ("segment_segments", "segment/segments.parquet", SEGMENT_SCHEMA, ["id"]),
    ("score_step_scores", "score/step_scores.parquet", STEP_SCORE_SCHEMA, ["id", "step_index"]),
    ("aggregate_sample_scores", "aggregate/sample_scores.parquet", SAMPLE_SCORE_SCHEMA, ["id"]),
    ("select_ranking", "select/subsets/ranking.parquet", RANKING_SCHEMA, ["id"]),
    ("cluster_clusters", "cluster/clusters.parquet", CLUSTER_SCHEMA, ["id"]),
)


class ArtifactUnreadable(ValueError):
    """An artifact that is missing or cannot be parsed (a truncated Parquet file); the message names it."""


def read_artifact(path: Path, read=None):
    """pq.read_table (or `read`) of one artifact, its failure named by path."""
    try:
        return (read or pq.read_table)(path)
    except (OSError, ValueError, pa.ArrowException) as error:  # ArrowInvalid is a ValueError; missing: OSError
        raise ArtifactUnreadable(f"{path}: {type(error).__name__}: {error}") from None


@dataclass(frozen=True)
class Suite:
    name: str
    table: pa.Table
    expectations: list[gxe.Expectation]


def type_name(field: pa.Field) -> str:
    """An Arrow field's type, list item names left out (Parquet writers differ), with nullability."""
    kind = field.type
    name = f"list<{kind.value_type}>" if pa.types.is_list(kind) or pa.types.is_large_list(kind) else str(kind)
    return name if field.nullable else f"{name} not null"


def schema_rows(artifact: str, actual: pa.Schema, expected: pa.Schema) -> list[dict]:
    """One row per column of either schema: 'column: type' as expected and as found (None if absent)."""
    names = list(expected.names) + [n for n in actual.names if n not in expected.names]
    return [
        {
            "artifact": artifact,
            "expected": f"{n}: {type_name(expected.field(n))}" if n in expected.names else None,
            "actual": f"{n}: {type_name(actual.field(n))}" if n in actual.names else None,
        }
        for n in names
    ]


def table_expectations(schema: pa.Schema, key: list[str]) -> list[gxe.Expectation]:
    """Columns exactly as the schema, no nulls where it forbids them, key unique."""
    expectations = [gxe.ExpectTableColumnsToMatchSet(column_set=list(schema.names), exact_match=True)]
    expectations += [gxe.ExpectColumnValuesToNotBeNull(column=f.name) for f in schema if not f.nullable]
    if len(key) == 1:
        expectations.append(gxe.ExpectColumnValuesToBeUnique(column=key[0]))
    else:
        expectations.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=key))
    return expectations


def equal(column_a: str, column_b: str) -> gxe.Expectation:
    # "neither": a value missing on one side or both is a failure, never a skipped row.
    return gxe.ExpectColumnPairValuesToBeEqual(column_A=column_a, column_B=column_b, ignore_row_if="neither")


def read_json(path: Path):
    return read_artifact(path, lambda p: json.loads(p.read_text(encoding="utf-8")))


def jsonl_lines(text: str) -> list[str]:
    r"""The lines of a JSONL text, split at "\n" only: unescaped JSON strings may hold U+2028 or \x0c.
    Blank lines hold no record (an empty quarantine.jsonl is one blank line: tasks/core/stage.py quarantine_text)."""
    return [line for line in text.split("\n") if line.strip()]


def count_lines(path: Path) -> int:
    return read_artifact(path, lambda p: len(jsonl_lines(p.read_text(encoding="utf-8"))))


def reconcile_row(outputs: Path, tables: dict[str, pa.Table]) -> dict:
    """Every count the stages report, beside the rows their artifacts actually hold."""
    row = {}
    for stage in STAGES_WITH_STATS:
        stats = read_json(outputs / stage / "stats.json")
        for key in ("read", "kept", "quarantined"):
            row[f"{stage}_{key}"] = stats.get(key)
        known = row[f"{stage}_kept"] is not None and row[f"{stage}_quarantined"] is not None
        row[f"{stage}_kept_plus_quarantined"] = row[f"{stage}_kept"] + row[f"{stage}_quarantined"] if known else None
    for stage in STAGES_WITH_QUARANTINE:
        row[f"{stage}_quarantine_lines"] = count_lines(outputs / stage / "quarantine.jsonl")
    row.update(
        clusters_rows=tables["cluster_clusters"].num_rows,
        traces_rows=tables["ingest_traces"].num_rows,
        segments_rows=tables["segment_segments"].num_rows,
        extract_rows=tables["extract"].num_rows,
        score_traces=len(pc.unique(tables["score_step_scores"]["id"])),
        sample_scores_rows=tables["aggregate_sample_scores"].num_rows,
        ranking_rows=tables["select_ranking"].num_rows,
        manifest_n_scored=read_json(outputs / "select" / "manifest.json").get("n_scored"),
    )
    return row


RECONCILE_PAIRS = (
    *((f"{s}_read", f"{s}_kept_plus_quarantined") for s in STAGES_WITH_STATS),
    *((f"{s}_quarantined", f"{s}_quarantine_lines") for s in STAGES_WITH_QUARANTINE),
    # Each stage's artifact holds what it kept, and the next stage read exactly that.
    ("ingest_kept", "traces_rows"),
    ("ingest_kept", "segment_read"),
    ("segment_kept", "segments_rows"),
    ("segment_kept", "extract_read"),
    ("extract_kept", "extract_rows"),
    ("extract_kept", "score_read"),
    ("extract_kept", "cluster_read"),
    ("cluster_kept", "clusters_rows"),
    ("score_kept", "score_traces"),
    ("score_kept", "aggregate_read"),
    ("aggregate_kept", "sample_scores_rows"),
    ("sample_scores_rows", "ranking_rows"),
    ("sample_scores_rows", "manifest_n_scored"),
)


def selection_rule(manifest: dict, scores: dict[str, list], segments: dict[str, list],
                   cluster_of: dict[str, int]) -> tuple[dict[str, list[str]], int | None]:
    """(subset name -> the ids select's rule gives, in rank order; how many traces the rule let compete),
    with the options the manifest records (select.choose, the rule select itself ran). ({}, None) where the
    rule cannot be applied: an option whose input is missing, or a manifest no Params can hold."""
    entries = manifest.get("subsets", {}).values()
    budgets = [e["token_budget"] for e in entries if e.get("token_budget") is not None]
    try:
        params = select_stage.Params(
            fractions=tuple(e["fraction"] for e in entries if e.get("fraction") is not None),
            token_budget=budgets[0] if budgets else None, stratify_by=manifest.get("stratify_by"),
            within_clusters=manifest.get("within_clusters", False), max_per_question=manifest.get("max_per_question"))
        question_of = {i: select_stage.question_key(p) for i, p in zip(segments["id"], segments["prompt_messages"])}
        ranked, eligible, picks = select_stage.choose(
            scores["id"], scores["score"], scores["n_tokens"], params, question_of=question_of,
            raw_by_id=dict(zip(segments["id"], segments["raw"])), cluster_of=cluster_of)
    except (ValueError, TypeError, KeyError):  # pydantic's ValidationError is a ValueError
        return {}, None
    position = {row: p for p, row in enumerate(ranked)}
    return ({name: [scores["id"][row] for row in sorted(rows, key=position.__getitem__)]
             for name, (_, rows) in picks.items()}, len(eligible))


def subset_rows(outputs: Path, tables: dict[str, pa.Table]) -> tuple[list[dict], list[dict]]:
    """Per subset in the manifest: its files against the manifest, the ranking and the rule; and every selected id."""
    manifest = read_json(outputs / "select" / "manifest.json")
    scores = tables["aggregate_sample_scores"].to_pydict()
    tokens = dict(zip(scores["id"], scores["n_tokens"]))
    segments = tables["segment_segments"].select(["id", "raw", "prompt_messages"]).to_pydict()
    raw = dict(zip(segments["id"], segments["raw"]))
    clusters = tables["cluster_clusters"].select(["id", "cluster"]).to_pydict()
    rule, n_eligible = selection_rule(manifest, scores, segments, dict(zip(clusters["id"], clusters["cluster"])))
    n_scored = len(scores["id"])
    ranking = tables["select_ranking"].select(["id", "rank"]).to_pydict()
    rank_of = dict(zip(ranking["id"], ranking["rank"]))
    subsets, selected = [], []
    for name, entry in sorted(manifest.get("subsets", {}).items()):
        folder = outputs / "select" / "subsets" / name
        ids_bytes, jsonl_bytes = (folder / "ids.txt").read_bytes(), (folder / "subset.jsonl").read_bytes()
        ids = ids_bytes.decode("utf-8").splitlines()
        records = [json.loads(line) for line in jsonl_lines(jsonl_bytes.decode("utf-8"))]
        fraction, budget = entry.get("fraction"), entry.get("token_budget")
        n_tokens = sum(tokens.get(i, 0) for i in ids)
        ranks = [rank_of.get(i) for i in ids]
        expected = rule.get(name)
        subsets.append({
            "subset": name,
            "n_selected": entry.get("n_selected"),
            "ids_lines": len(ids),
            "unique_ids": len(set(ids)),
            "jsonl_lines": len(records),
            "jsonl_matching_raw": sum(i in raw and rec == json.loads(raw[i]) for i, rec in zip(ids, records)),
            "manifest_n_total": entry.get("n_total"),
            "sample_scores_rows": n_scored,
            # against the traces the rule let compete: max_per_question leaves out a question's later responses
            "size_error": len(ids) - select_stage.fraction_size(fraction, n_eligible)
            if fraction is not None and n_eligible else None,
            "budget_left": budget - n_tokens if budget is not None else None,
            "manifest_n_tokens": entry.get("n_tokens"),
            "ids_n_tokens": n_tokens,
            "manifest_sha256_ids": entry.get("sha256_ids_txt"),
            "file_sha256_ids": hashlib.sha256(ids_bytes).hexdigest(),
            "manifest_sha256_jsonl": entry.get("sha256_subset_jsonl"),
            "file_sha256_jsonl": hashlib.sha256(jsonl_bytes).hexdigest(),
            # ids.txt in ranking order (a reordered subset is not best first), and exactly the ids the
            # rule picks from the sample scores (a subset one short, even with its manifest made to agree)
            "rank_order_breaks": None if None in ranks else sum(a >= b for a, b in zip(ranks, ranks[1:])),
            "rule_sha256_ids": None if expected is None else
            hashlib.sha256("".join(i + "\n" for i in expected).encode("utf-8")).hexdigest(),
        })
        selected += [
            {"subset": name, "id": i, "segments_id": i if i in raw else None,
             "sample_scores_id": i if i in tokens else None}
            for i in ids
        ]
    return subsets, selected


def subset_expectations() -> list[gxe.Expectation]:
    return [
        equal("n_selected", "ids_lines"),
        equal("ids_lines", "unique_ids"),
        equal("ids_lines", "jsonl_lines"),
        equal("ids_lines", "jsonl_matching_raw"),
        equal("manifest_n_total", "sample_scores_rows"),
        equal("manifest_n_tokens", "ids_n_tokens"),
        equal("manifest_sha256_ids", "file_sha256_ids"),
        equal("manifest_sha256_jsonl", "file_sha256_jsonl"),
        equal("rule_sha256_ids", "file_sha256_ids"),
        gxe.ExpectColumnValuesToBeBetween(column="rank_order_breaks", min_value=0, max_value=0),
        gxe.ExpectColumnValuesToNotBeNull(column="rank_order_breaks"),
        # Within one sample of round(fraction * n): select may round halves either way.
        gxe.ExpectColumnValuesToBeBetween(column="size_error", min_value=-1, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="budget_left", min_value=0),
    ]


def read_extract_shards(outputs: Path) -> tuple[pa.Table, list[dict]]:
    """All extract shards concatenated (as EXTRACT_SCHEMA where they conform), and each shard's schema rows."""
    shards = sorted((outputs / "extract" / "shards").glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"validate: no extract shards under {outputs / 'extract' / 'shards'}")
    tables, rows = [], []
    for shard in shards:
        table = read_artifact(shard)
        rows += schema_rows(f"extract/shards/{shard.name}", table.schema, EXTRACT_SCHEMA)
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive"), rows


def non_finite_per_row(values: pa.ChunkedArray, n_rows: int) -> np.ndarray:
    """(n_rows,) how many items of each row's list are NaN, infinite or null (a null list counts none)."""
    values = values.combine_chunks()
    flat = pc.list_flatten(values)
    bad = pc.invert(pc.fill_null(pc.is_finite(flat), False)).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
    return np.bincount(parents[bad], minlength=n_rows)


def extract_shapes(extract: pa.Table) -> pa.Table:
    """Per trace: span and Gram sizes against what n_steps says they must be; its non-finite numbers."""
    n_spans = pc.add(extract["n_steps"], 1)
    columns = {
        "id": extract["id"],
        "n_spans": n_spans,
        "span_token_counts_size": pc.list_value_length(extract["span_token_counts"]),
        "span_loss_sums_size": pc.list_value_length(extract["span_loss_sums"]),
        "gram_size_expected": pc.multiply(n_spans, n_spans),
        "proxy_gram_size": pc.list_value_length(extract["proxy_gram"]),
        # head_gram is optional: where absent, compare the expected size with itself.
        "head_gram_size": pc.coalesce(pc.list_value_length(extract["head_gram"]), pc.multiply(n_spans, n_spans)),
        # score refuses a NaN in a Gram, but aggregate's baselines read losses and counts directly
        "non_finite_numbers": pa.array(sum(non_finite_per_row(extract[c], extract.num_rows)
                                           for c in ("span_loss_sums", "proxy_gram", "head_gram"))),
    }
    return pa.table({name: pc.cast(values, pa.int64()) if name != "id" else values for name, values in columns.items()})


def step_missing(steps: pa.Table, first_step: str | None) -> pa.Table:
    """Per step: values missing (null or NaN) where score writes one, and values where it writes none.

    Only `score.first_step: skip` leaves a value out (consistency and step score of step 1), so with
    `alpha` a NaN is a fault, not a skipped step that aggregate would quietly pass over.
    """
    skipped = (first_step == "skip") & (steps["step_index"].to_numpy() == 0)  # (n,)
    missing = {c: pc.is_null(steps[c], nan_is_null=True).to_numpy(zero_copy_only=False)  # (n,) each
               for c in ("alpha", "consistency", "step_score")}
    unexpected_missing = (missing["alpha"].astype(np.int64) + (missing["consistency"] & ~skipped)
                          + (missing["step_score"] & ~skipped))
    unexpected_value = (skipped & ~missing["consistency"]).astype(np.int64) + (skipped & ~missing["step_score"])
    return pa.table({"id": steps["id"], "step_index": steps["step_index"],
                     "unexpected_missing": unexpected_missing, "unexpected_value": unexpected_value})


def recomputed_hashes(tables: dict[str, pa.Table]) -> pa.Table:
    """Per trace of traces.parquet, segments.parquet and the extract shards: the content_hash stored beside the
    one its prompt_messages and response give (extract's: the segment's), so a replaced response shows."""
    rows, of_segment = [], {}
    for name in ("ingest_traces", "segment_segments"):
        table = tables[name].select(["id", "content_hash", "prompt_messages", "response"]).to_pydict()
        for i, stored, prompt, response in zip(table["id"], table["content_hash"], table["prompt_messages"],
                                               table["response"]):
            digest = content_hash(prompt, response) if isinstance(prompt, str) and isinstance(response, str) else None
            rows.append({"artifact": name, "id": i, "stored": stored, "recomputed": digest})
            if name == "segment_segments":
                of_segment[i] = digest
    extract = tables["extract"].select(["id", "content_hash"]).to_pydict()
    rows += [{"artifact": "extract", "id": i, "stored": stored, "recomputed": of_segment.get(i)}
             for i, stored in zip(extract["id"], extract["content_hash"])]
    return pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in ("artifact", "id", "stored",
                                                                                   "recomputed")]))


def span_faults(segments: pa.Table) -> pa.Table:
    """Per segment: what is wrong with its spans (a count that is not n_steps, a span empty or outside its
    scored response), or null."""
    table = segments.select(["id", "scored_response", "step_starts", "step_ends", "answer_start", "answer_end",
                             "n_steps"]).to_pydict()
    faults = []
    for i, text, starts, ends, start, end, n_steps in zip(*table.values()):
        fault = None
        if text is None or None in (starts, ends, start, end, n_steps):
            fault = "a span column is null"
        elif not len(starts) == len(ends) == n_steps:
            fault = f"{len(starts)} step starts, {len(ends)} ends for n_steps {n_steps}"
        else:
            spans = [*zip(starts, ends), (start, end)]
            outside = [k for k, (a, b) in enumerate(spans) if not 0 <= a < b <= len(text)]
            if outside:
                k = outside[0]
                fault = (f"{'answer span' if k == n_steps else f'step {k}'} {spans[k]} is empty or leaves the "
                         f"{len(text)}-char response")
        faults.append(fault)
    return pa.table({"id": pa.array(table["id"], pa.string()), "span_fault": pa.array(faults, pa.string())})


def step_recomputed(steps: pa.Table, lambda_) -> pa.Table:
    """Per step: |step_score - (lambda * alpha + (1 - lambda) * consistency)|, score's own formula with the
    lambda_ its stats.json records (null where a value is missing; inf where lambda_ is not recorded)."""
    alpha = steps["alpha"].to_numpy(zero_copy_only=False).astype(np.float64)  # (n,)
    consistency = pc.fill_null(steps["consistency"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    stored = pc.fill_null(steps["step_score"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    weight = float(lambda_) if isinstance(lambda_, (int, float)) and not isinstance(lambda_, bool) else np.nan
    error = np.abs(stored - (weight * alpha + (1.0 - weight) * consistency))  # (n,)
    # a missing value (a skipped step, or a fault) is score_missing's to judge; a missing lambda_ fails every row
    skipped = (np.isnan(stored) | np.isnan(consistency) | np.isnan(alpha)) & np.isfinite(weight)
    return pa.table({"id": steps["id"], "step_index": steps["step_index"],
                     "step_score_error": pa.array(np.where(np.isnan(error), np.inf, error), mask=skipped)})


def sample_recomputed(tables: dict[str, pa.Table], aggregate_stats: dict) -> pa.Table:
    """Per scored trace: its ranking score against its sample score, its cluster, and (score.method grace) its
    sample score against the one aggregate's rule gives from its step scores (inf where that cannot be had)."""
    samples = tables["aggregate_sample_scores"].select(["id", "score", "method"]).to_pydict()
    ranking = tables["select_ranking"].select(["id", "score"]).to_pydict()
    ranked = dict(zip(ranking["id"], ranking["score"]))
    clusters = tables["cluster_clusters"].select(["id", "cluster"]).to_pydict()
    cluster_of = dict(zip(clusters["id"], clusters["cluster"]))
    recomputed: dict[str, float] = {}
    how, tau = aggregate_stats.get("how"), aggregate_stats.get("softmin_tau", 0.1)
    if how in ("mean", "min", "softmin", "token_mean") and isinstance(tau, (int, float)) and tau > 0:
        ids, values, _ = grace_sample_scores(tables["score_step_scores"], how, float(tau))
        recomputed = dict(zip(ids.tolist(), values.tolist()))

    def error(a, b) -> float:
        return abs(a - b) if a is not None and b is not None and math.isfinite(a - b) else math.inf

    return pa.table({
        "id": pa.array(samples["id"], pa.string()),
        "ranking_score_error": pa.array([error(ranked.get(i), s) for i, s in zip(samples["id"], samples["score"])]),
        "clusters_id": pa.array([i if i in cluster_of else None for i in samples["id"]], pa.string()),
        # baselines are not recomputed here (ifd needs the unconditional losses): null, which the check skips
        "score_error": pa.array([error(recomputed.get(i), s) if m == "grace" else None
                                 for i, s, m in zip(samples["id"], samples["score"], samples["method"])], pa.float64()),
    })


def build_suites(outputs: Path) -> list[Suite]:
    """Read every artifact under `outputs` and pair each table with what it must satisfy."""
    tables = {name: read_artifact(outputs / path) for name, path, _, _ in ARTIFACTS}
    tables["extract"], schema_check = read_extract_shards(outputs)
    for name, schema in [(a[0], a[2]) for a in ARTIFACTS] + [("extract", EXTRACT_SCHEMA)]:
        missing = [n for n in schema.names if n not in tables[name].column_names]
        if missing:  # the derived tables below need every column; type drift is left to the schema suite
            raise ArtifactUnreadable(f"validate: {name} lacks columns {missing}")
    for name, path, schema, _ in ARTIFACTS:
        schema_check += schema_rows(path, tables[name].schema, schema)
    cosine = {"min_value": -1 - COSINE_TOLERANCE, "max_value": 1 + COSINE_TOLERANCE}
    subsets, selected = subset_rows(outputs, tables)
    score_stats = read_json(outputs / "score" / "stats.json")

    suites = [Suite("schema", pa.Table.from_pylist(schema_check), [equal("expected", "actual")])]
    for name, _, schema, key in ARTIFACTS:
        extra = []
        if name == "score_step_scores":
            extra = [gxe.ExpectColumnValuesToBeBetween(column=c, **cosine)
                     for c in ("alpha", "consistency", "step_score")]
        suites.append(Suite(name, tables[name], table_expectations(schema, key) + extra))
    suites += [
        Suite("extract", tables["extract"], table_expectations(EXTRACT_SCHEMA, ["id"])),
        Suite("extract_shapes", extract_shapes(tables["extract"]), [
            equal("n_spans", "span_token_counts_size"), equal("n_spans", "span_loss_sums_size"),
            equal("gram_size_expected", "proxy_gram_size"), equal("gram_size_expected", "head_gram_size"),
            gxe.ExpectColumnValuesToBeBetween(column="n_spans", min_value=2),  # at least one step and the answer
            gxe.ExpectColumnValuesToBeBetween(column="non_finite_numbers", min_value=0, max_value=0),
        ]),
        Suite("score_missing", step_missing(tables["score_step_scores"], score_stats.get("first_step")), [
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=0)
            for c in ("unexpected_missing", "unexpected_value")]),
        Suite("recomputed_hashes", recomputed_hashes(tables), [equal("stored", "recomputed")]),
        Suite("segment_spans", span_faults(tables["segment_segments"]),
              [gxe.ExpectColumnValuesToBeNull(column="span_fault")]),
        Suite("recomputed_step_scores", step_recomputed(tables["score_step_scores"], score_stats.get("lambda_")),
              [gxe.ExpectColumnValuesToBeBetween(column="step_score_error", min_value=0,
                                                 max_value=RECOMPUTE_TOLERANCE)]),
        Suite("recomputed_sample_scores", sample_recomputed(tables, read_json(outputs / "aggregate" / "stats.json")), [
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=RECOMPUTE_TOLERANCE)
            for c in ("ranking_score_error", "score_error")] + [equal("id", "clusters_id")]),
        Suite("reconcile", pa.Table.from_pylist([reconcile_row(outputs, tables)]),
              [equal(a, b) for a, b in RECONCILE_PAIRS]),
        Suite("select_subsets", pa.Table.from_pylist(subsets), subset_expectations()),
        Suite("select_ids", pa.table({k: pa.array([r[k] for r in selected], pa.string())
                                      for k in ("subset", "id", "segments_id", "sample_scores_id")}),
              [equal("id", "segments_id"), equal("id", "sample_scores_id")]),
    ]
    return suites
