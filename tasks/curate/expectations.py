"""The expectation suites `validate` runs: one table and its great-expectations expectations each.

A suite's table is an artifact as written, or a small table derived from several artifacts so the
cross-stage checks (schemas, counts reconciling, subsets, ids upstream) show in Data Docs as well.
Artifacts are read from their files directly (extract shard by shard), not through each stage's
own reader, so a reader that casts or repairs cannot hide what is on disk.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.schema import (EXTRACT_SCHEMA, RANKING_SCHEMA, SAMPLE_SCORE_SCHEMA, SEGMENT_SCHEMA, STEP_SCORE_SCHEMA,
                               TRACE_SCHEMA)
from tasks.curate import select as select_stage

# score clips cosines to [-1, 1], but lambda*alpha + (1-lambda)*c may still round a hair past 1.
COSINE_TOLERANCE = 1e-9
STAGES_WITH_STATS = ("ingest", "segment", "extract", "score", "aggregate")
STAGES_WITH_QUARANTINE = ("ingest", "segment", "extract")
# (suite name, file under outputs/, schema, key columns that are unique per row)
ARTIFACTS = (
    ("ingest_traces", "ingest/traces.parquet", TRACE_SCHEMA, ["id"]),
    ("segment_segments", "segment/segments.parquet", SEGMENT_SCHEMA, ["id"]),
    ("score_step_scores", "score/step_scores.parquet", STEP_SCORE_SCHEMA, ["id", "step_index"]),
    ("aggregate_sample_scores", "aggregate/sample_scores.parquet", SAMPLE_SCORE_SCHEMA, ["id"]),
    ("select_ranking", "select/subsets/ranking.parquet", RANKING_SCHEMA, ["id"]),
)


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
    return json.loads(path.read_text(encoding="utf-8"))


def jsonl_lines(text: str) -> list[str]:
    r"""The lines of a JSONL text, split at "\n" only: unescaped JSON strings may hold U+2028 or \x0c."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def count_lines(path: Path) -> int:
    return len(jsonl_lines(path.read_text(encoding="utf-8")))


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
    ("score_kept", "score_traces"),
    ("score_kept", "aggregate_read"),
    ("aggregate_kept", "sample_scores_rows"),
    ("sample_scores_rows", "ranking_rows"),
    ("sample_scores_rows", "manifest_n_scored"),
)


def rule_ids(entry: dict, stratify_by: str | None, scores: dict[str, list], raw: dict[str, str]) -> list[str] | None:
    """The ids select's rule gives for one manifest entry from the sample scores: the top k of the
    ranking (of each stratum), in rank order. None where a stratum cannot be read (an id not upstream)."""
    ids = scores["id"]
    ranked = select_stage.rank_order(ids, scores["score"])
    strata: dict[str, list[int]] = {"all": ranked}
    if stratify_by is not None:
        if any(ids[row] not in raw for row in ranked):
            return None
        strata = {}
        for row in ranked:
            strata.setdefault(select_stage.stratum_of(raw[ids[row]], stratify_by), []).append(row)
    fraction, budget = entry.get("fraction"), entry.get("token_budget")
    params = select_stage.Params(fractions=() if fraction is None else (float(fraction),), token_budget=budget)
    [(_, rows)] = select_stage.pick_subsets(strata, scores["n_tokens"], params).values()
    position = {row: p for p, row in enumerate(ranked)}
    return [ids[row] for row in sorted(rows, key=position.__getitem__)]


def subset_rows(outputs: Path, tables: dict[str, pa.Table]) -> tuple[list[dict], list[dict]]:
    """Per subset in the manifest: its files against the manifest, the ranking and the rule; and every selected id."""
    manifest = read_json(outputs / "select" / "manifest.json")
    scores = tables["aggregate_sample_scores"].to_pydict()
    tokens = dict(zip(scores["id"], scores["n_tokens"]))
    segments = tables["segment_segments"].select(["id", "raw"]).to_pydict()
    raw = dict(zip(segments["id"], segments["raw"]))
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
        expected = rule_ids(entry, manifest.get("stratify_by"), scores, raw)
        subsets.append({
            "subset": name,
            "n_selected": entry.get("n_selected"),
            "ids_lines": len(ids),
            "unique_ids": len(set(ids)),
            "jsonl_lines": len(records),
            "jsonl_matching_raw": sum(i in raw and rec == json.loads(raw[i]) for i, rec in zip(ids, records)),
            "manifest_n_total": entry.get("n_total"),
            "sample_scores_rows": n_scored,
            "size_error": len(ids) - round(fraction * n_scored) if fraction is not None else None,
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
        table = pq.read_table(shard)
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


def build_suites(outputs: Path) -> list[Suite]:
    """Read every artifact under `outputs` and pair each table with what it must satisfy."""
    tables = {name: pq.read_table(outputs / path) for name, path, _, _ in ARTIFACTS}
    tables["extract"], schema_check = read_extract_shards(outputs)
    for name, schema in [(a[0], a[2]) for a in ARTIFACTS] + [("extract", EXTRACT_SCHEMA)]:
        missing = [n for n in schema.names if n not in tables[name].column_names]
        if missing:  # the derived tables below need every column; type drift is left to the schema suite
            raise ValueError(f"validate: {name} lacks columns {missing}")
    for name, path, schema, _ in ARTIFACTS:
        schema_check += schema_rows(path, tables[name].schema, schema)
    cosine = {"min_value": -1 - COSINE_TOLERANCE, "max_value": 1 + COSINE_TOLERANCE}
    subsets, selected = subset_rows(outputs, tables)

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
        Suite("score_missing", step_missing(tables["score_step_scores"],
                                            read_json(outputs / "score" / "stats.json").get("first_step")), [
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=0)
            for c in ("unexpected_missing", "unexpected_value")]),
        Suite("reconcile", pa.Table.from_pylist([reconcile_row(outputs, tables)]),
              [equal(a, b) for a, b in RECONCILE_PAIRS]),
        Suite("select_subsets", pa.Table.from_pylist(subsets), subset_expectations()),
        Suite("select_ids", pa.table({k: pa.array([r[k] for r in selected], pa.string())
                                      for k in ("subset", "id", "segments_id", "sample_scores_id")}),
              [equal("id", "segments_id"), equal("id", "sample_scores_id")]),
    ]
    return suites
