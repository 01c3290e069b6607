"""Stage `select`: rank scored traces and write the top subsets, ready for SFT.

    python -m tasks.curate.select --sample-scores outputs/aggregate/sample_scores.parquet \
        --segments outputs/segment/segments.parquet --out-dir outputs/select

Ranking: score descending, ties broken by sha256(id), so the order never depends on input order.
Fraction subsets keep max(1, round_half_up(fraction * n)) traces, with the fraction taken as
written in params.yaml (0.05 * 1770 = 88.5 -> 89). A token-budget subset is a prefix of the
ranking: it stops at the first trace whose response tokens would overflow the budget, so every
kept trace outranks every dropped one (packing shorter traces past that point would select by
length, not by score). With `stratify_by`, each stratum gets its share of every subset
(largest-remainder counts; a budget split by the strata's trace counts) and is filled best-first.
With `max_per_question` (several responses per question, as rejection sampling gives), only the
best-ranked responses of each question (same prompt turns) up to the cap can be selected; fractions
and budgets then count the traces left. Every subset's manifest entry has its responses-per-question
histogram, and ranking.parquet each trace's question key, for the report and `grace diff`.

With `within_clusters` the strata are the cluster stage's problem clusters (combined with
`stratify_by` if both are set): each cluster keeps its share of every subset, filled by score.
Why shares rather than scores standardised within clusters: a share fixes the subset's problem mix
to the pool's exactly (a random subset's mix in expectation), whatever the score's scale does inside
a cluster, and it needs no assumption that scores are comparable across clusters after z-scoring.
Every subset reports how many clusters it covers, with or without this option.

Outputs: subsets/<name>/{subset.jsonl, ids.txt} in rank order, subsets/ranking.parquet,
manifest.json (everything, content hashes included) and metrics.json (the DVC metrics file: per
subset its size, tokens and score threshold).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.schema import RANKING_SCHEMA
from tasks.core.stage import (ParamsError, Stage, StageInputError, atomic_outputs, atomic_write_text, params_section,
                              stage_logger, write_json, write_parquet)
from tasks.curate.cluster import read_clusters

MISSING_STRATUM = "<missing>"


@params_section("select")
class Params:
    fractions: tuple[float, ...] = (0.05, 0.1, 0.2)  # one subset per fraction of the scored traces
    token_budget: int | None = None  # also one subset whose response tokens fit this budget
    stratify_by: str | None = None  # a field of the input record; each stratum keeps its share
    within_clusters: bool = False  # each problem cluster (cluster stage) keeps its share of every subset
    max_per_question: int | None = None  # at most this many responses per question (best first); null = no cap

    def check(self) -> None:
        if self.max_per_question is not None and (isinstance(self.max_per_question, bool) or not isinstance(
                self.max_per_question, int) or self.max_per_question < 1):
            raise ParamsError(f"select.max_per_question: {self.max_per_question!r} is not a positive integer or null")
        for fraction in self.fractions:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ParamsError(f"select.fractions: {fraction!r} is not a number in (0, 1]")
        names = [fraction_subset_name(f) for f in self.fractions]
        if len(set(names)) != len(names):
            raise ParamsError(f"select.fractions: {list(self.fractions)} gives repeated subset names {names}")
        if self.token_budget is not None and (
            isinstance(self.token_budget, bool) or not isinstance(self.token_budget, int) or self.token_budget <= 0
        ):
            raise ParamsError(f"select.token_budget: {self.token_budget!r} is not a positive integer or null")
        if not self.fractions and self.token_budget is None:
            raise ParamsError("select.fractions is empty and select.token_budget is null: nothing to select")
        if self.stratify_by is not None and (not isinstance(self.stratify_by, str) or not self.stratify_by):
            raise ParamsError(f"select.stratify_by: {self.stratify_by!r} is not a field name or null")
        if not isinstance(self.within_clusters, bool):
            raise ParamsError(f"select.within_clusters: {self.within_clusters!r}; expected true or false")


def fraction_subset_name(fraction: float) -> str:
    return f"top{fraction * 100:g}pct"


def fraction_size(fraction: float, n: int) -> int:
    """round_half_up(fraction * n), at least 1; exact decimal arithmetic on the fraction as written."""
    size = int((Decimal(repr(fraction)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    return max(1, size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rank_order(ids: list[str], scores: list[float]) -> list[int]:
    """Row indices best first: score descending, then sha256(id) ascending."""
    return sorted(range(len(ids)), key=lambda i: (-scores[i], sha256_hex(ids[i].encode("utf-8"))))


def largest_remainder(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split `total` in proportion to `weights`, summing exactly.

    Leftover units go by largest remainder; ties to the larger stratum, then by name.
    """
    weight_sum = sum(weights.values())
    quotas = {key: Fraction(total * w, weight_sum) for key, w in weights.items()}
    counts = {key: math.floor(q) for key, q in quotas.items()}
    by_remainder = sorted(weights, key=lambda key: (-(quotas[key] - counts[key]), -weights[key], key))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def take_budget(ranked: list[int], n_tokens: list[int], budget: int) -> list[int]:
    """The longest prefix of `ranked` whose response tokens fit `budget` (stop at the first overflow)."""
    kept, used = [], 0
    for row in ranked:
        if used + n_tokens[row] > budget:
            break
        kept.append(row)
        used += n_tokens[row]
    return kept


def stratum_of(raw: str, field: str) -> str:
    """The stratum key of one input record; an absent or null field is MISSING_STRATUM."""
    value = json.loads(raw).get(field)
    if value is None:
        return MISSING_STRATUM
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def question_key(prompt_messages: str) -> str:
    """The question a response answers: its prompt turns (system turn included), as 16 hex of sha256."""
    return sha256_hex(prompt_messages.encode("utf-8"))[:16]


def per_question(questions: list[str | None]) -> dict[str, int]:
    """{k: number of questions with k responses} over the given question keys (JSON keys: strings)."""
    histogram = Counter(Counter(questions).values())
    return {str(k): histogram[k] for k in sorted(histogram)}


def per_question_text(histogram: dict[str, int] | None) -> str:
    """A per_question histogram as "1 x 40, 2 x 3" (responses x questions); "-" for none."""
    return ", ".join(f"{k} x {n}" for k, n in histogram.items()) if histogram else "-"


def read_scores(sample_scores: Path) -> tuple[dict[str, list], str]:
    """The scored traces as columns, refusing what cannot be ranked; plus their one score method."""
    scores = pq.read_table(sample_scores, columns=["id", "score", "method", "n_tokens"]).to_pydict()
    ids = scores["id"]
    if not ids:
        raise StageInputError(f"select: {sample_scores} holds no scored traces")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise StageInputError(f"select: {sample_scores} repeats ids {duplicates[:5]}")
    not_finite = [i for i, s in zip(ids, scores["score"]) if not math.isfinite(s)]
    if not_finite:
        raise StageInputError(f"select: {len(not_finite)} traces have a non-finite score (e.g. {not_finite[:5]}); "
                         "fix aggregate")
    methods = sorted(set(scores["method"]))
    if len(methods) != 1:
        raise StageInputError(f"select: {sample_scores} mixes score methods {methods}")
    return scores, methods[0]


def pick_subsets(strata: dict[str, list[int]], n_tokens: list[int],
                 params: Params) -> dict[str, tuple[dict, list[int]]]:
    """name -> (its manifest spec, its rows); every stratum list is in rank order."""
    sizes = {key: len(rows) for key, rows in strata.items()}
    n = sum(sizes.values())
    picks = {}
    for fraction in params.fractions:
        quota = largest_remainder(fraction_size(fraction, n), sizes)
        rows = [row for key, ranked in strata.items() for row in ranked[: quota[key]]]
        picks[fraction_subset_name(fraction)] = ({"fraction": fraction}, rows)
    if params.token_budget is not None:
        # Integer floor per stratum, so the strata's budgets never add up past the total.
        rows = [row for key, ranked in strata.items()
                for row in take_budget(ranked, n_tokens, params.token_budget * sizes[key] // n)]
        picks[f"budget{params.token_budget}tok"] = ({"token_budget": params.token_budget}, rows)
    return picks


def choose(ids: list[str], scores: list[float], n_tokens: list[int], params: Params, *, question_of: dict[str, str],
           raw_by_id: dict[str, str], cluster_of: dict[str, int]) -> tuple[list[int], list[int], dict]:
    """select's whole rule, also what validate checks subsets against: (rows best first, rows eligible under
    max_per_question, name -> (manifest spec, rows)). Raises ValueError where an option lacks what it reads."""
    ranked = rank_order(ids, scores)
    eligible = ranked
    if params.max_per_question is not None:
        missing = [i for i in ids if i not in question_of]
        if missing:
            raise ValueError(f"select: cannot cap per question, {len(missing)} scored ids are not in segments")
        taken: Counter[str] = Counter()
        eligible = []
        for row in ranked:  # the best-ranked responses of each question, up to the cap
            taken[question_of[ids[row]]] += 1
            if taken[question_of[ids[row]]] <= params.max_per_question:
                eligible.append(row)
    strata: dict[str, list[int]] = {"all": eligible}
    if params.stratify_by is not None or params.within_clusters:
        missing = [i for i in ids if i not in raw_by_id or (params.within_clusters and i not in cluster_of)]
        if missing:
            raise ValueError(f"select: cannot stratify, {len(missing)} scored ids are not in segments "
                             f"{'or clusters ' if params.within_clusters else ''}(e.g. {missing[:5]})")
        strata = {}
        for row in eligible:  # each stratum's list stays in rank order
            parts = [] if params.stratify_by is None else [stratum_of(raw_by_id[ids[row]], params.stratify_by)]
            if params.within_clusters:
                parts.append(f"cluster-{cluster_of[ids[row]]}")
            strata.setdefault(" / ".join(parts), []).append(row)
    return ranked, eligible, pick_subsets(strata, n_tokens, params)


def write_subset(directory: Path, chosen: list[str], raw_by_id: dict[str, str]) -> dict:
    """subset.jsonl (the input records, one JSON line each) and ids.txt, in rank order; their hashes."""
    missing = [i for i in chosen if i not in raw_by_id]
    if missing:
        raise ValueError(f"select: {directory.name}: {len(missing)} selected ids are not in segments: {missing[:5]}")
    if any(i.splitlines() != [i] for i in chosen):  # ingest refuses such ids (id_line_break)
        raise ValueError(f"select: {directory.name}: an id contains a line break, which ids.txt cannot hold")
    jsonl = "".join(json.dumps(json.loads(raw_by_id[i]), ensure_ascii=False) + "\n" for i in chosen)
    ids_txt = "".join(i + "\n" for i in chosen)
    atomic_write_text(directory / "subset.jsonl", jsonl)
    atomic_write_text(directory / "ids.txt", ids_txt)
    return {"sha256_subset_jsonl": sha256_hex(jsonl.encode("utf-8")),
            "sha256_ids_txt": sha256_hex(ids_txt.encode("utf-8"))}


@atomic_outputs
def select(sample_scores: Path, segments: Path, out_dir: Path, params: Params, clusters: Path | None = None) -> dict:
    """Rank traces by score and write the top-fraction and token-budget subsets.

    `clusters` (the cluster stage's clusters.parquet) gives each subset's cluster coverage and is
    needed by `within_clusters`; without it coverage is not reported.
    """
    scores, method = read_scores(sample_scores)
    ids, n = scores["id"], len(scores["id"])
    segment_table = pq.read_table(segments, columns=["id", "raw", "prompt_messages"]).to_pydict()
    raw_by_id = dict(zip(segment_table["id"], segment_table["raw"]))
    question_of = {i: question_key(p) for i, p in zip(segment_table["id"], segment_table["prompt_messages"])}
    if clusters is None and params.within_clusters:
        raise ValueError("select.within_clusters needs the cluster stage's clusters.parquet (--clusters)")
    cluster_of = {} if clusters is None else read_clusters(clusters)
    unclustered = [] if clusters is None else [i for i in ids if i not in cluster_of]
    if unclustered:
        raise ValueError(f"select: {len(unclustered)} scored ids have no cluster in {clusters} "
                         f"(e.g. {unclustered[:5]}); rerun the cluster stage on the same extract output")

    ranked, eligible, picks = choose(ids, scores["score"], scores["n_tokens"], params, question_of=question_of,
                                     raw_by_id=raw_by_id, cluster_of=cluster_of)
    rank_of = {row: position for position, row in enumerate(ranked)}
    subsets_dir = out_dir / "subsets"
    manifest_subsets, selected_in = {}, {row: [] for row in ranked}
    for name, (spec, rows) in picks.items():
        rows = sorted(rows, key=rank_of.__getitem__)
        chosen = [ids[row] for row in rows]
        entry = {
            **spec,
            **write_subset(subsets_dir / name, chosen, raw_by_id),
            "n_selected": len(rows),
            "n_total": n,
            "n_tokens": sum(scores["n_tokens"][row] for row in rows),
            "score_threshold": scores["score"][rows[-1]] if rows else None,  # lowest kept score
            "method": method,
            "n_clusters_covered": len({cluster_of[i] for i in chosen}) if cluster_of else None,
            "responses_per_question": per_question([question_of.get(i) for i in chosen]),
        }
        if params.stratify_by is not None:
            strata_counts = Counter(stratum_of(raw_by_id[i], params.stratify_by) for i in chosen)
            entry["strata"] = dict(sorted(strata_counts.items()))
        manifest_subsets[name] = entry
        for row in rows:
            selected_in[row].append(name)

    ranking = {
        "id": [ids[row] for row in ranked],
        "score": [scores["score"][row] for row in ranked],
        "rank": list(range(1, n + 1)),
        "selected_in": [selected_in[row] for row in ranked],
        "question": [question_of.get(ids[row]) for row in ranked],
    }
    write_parquet(subsets_dir / "ranking.parquet", pa.table(ranking, schema=RANKING_SCHEMA))
    manifest = {
        "n_scored": n,
        "method": method,
        "stratify_by": params.stratify_by,
        "within_clusters": params.within_clusters,
        "n_clusters": len(set(cluster_of.values())) if cluster_of else None,
        "max_per_question": params.max_per_question,
        "n_capped": n - len(eligible),  # responses past max_per_question: never selected
        "responses_per_question": per_question([question_of.get(i) for i in ids]),  # of the scored traces
        "n_selected": {name: entry["n_selected"] for name, entry in manifest_subsets.items()},
        "subsets": manifest_subsets,
    }
    write_json(out_dir / "manifest.json", manifest)
    write_json(out_dir / "metrics.json", {name: {key: entry[key] for key in ("n_selected", "n_tokens", "score_threshold",
                                                                             "n_clusters_covered")}
                                          for name, entry in manifest_subsets.items()})
    stage_logger("select").info("select: ranked %d, %s", n, ", ".join(
        f"{name} {entry['n_selected']} (threshold {entry['score_threshold']:.4g})" if entry["n_selected"]
        else f"{name} 0" for name, entry in manifest_subsets.items()))
    return manifest


STAGE = Stage(select, Params, paths=[
    ("sample_scores", "aggregate's sample_scores.parquet"),
    ("segments", "segment's segments.parquet (the raw input records)"),
    ("clusters", "the cluster stage's clusters.parquet (problem clusters: coverage, within_clusters)"),
    ("out_dir", "where subsets/ and manifest.json go"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
