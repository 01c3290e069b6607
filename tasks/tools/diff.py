"""Compare two curation versions: params, subsets, sample-score ranks and the steps that moved them.

    grace diff A B [--repo .] [--top 5] [--json]

A and B are each a directory (an outputs/ tree, or a folder holding sample_scores.parquet /
ranking.parquet / <subset>/ids.txt) or else a revision of the DVC repository `--repo`: a git
commit, branch or tag, a `dvc exp` experiment name, or `workspace`. Revisions are read through
DVC, so artifacts come from the DVC cache (or the default remote) as they were at that revision.

The traces that explain a change of selection are those that crossed a subset's boundary (in the
subset in one version only): each is listed with its rank, score and the subset's threshold in
both versions, and its steps (text, alpha, consistency, step score), numbered from 1 as in the
report. The largest rank movers follow; they are often far from every boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tasks.curate.select import per_question, per_question_text

# Where each artifact may lie below a version's root, first match wins: the repo/outputs layout
# of dvc.yaml, then a flat folder of copied files.
ROOT_PREFIXES = ("outputs/", "")
ARTIFACT_PATHS = {
    "sample_scores": ("aggregate/sample_scores.parquet", "sample_scores.parquet"),
    "ranking": ("select/subsets/ranking.parquet", "subsets/ranking.parquet", "ranking.parquet"),
    "step_scores": ("score/step_scores.parquet", "step_scores.parquet"),
    "segments": ("segment/segments.parquet", "segments.parquet"),
}
SEGMENT_COLUMNS = ["id", "scored_response", "step_starts", "step_ends"]
TEXT_WIDTH = 70  # characters of step text per markdown cell; JSON has the whole step
SUBSET_DIRS = ("select/subsets", "subsets", "")
STEP_COLUMNS = ("alpha", "consistency", "step_score")


class VersionError(ValueError):
    """A version argument that names neither a directory nor a revision, or one that holds no outputs."""


@dataclass(frozen=True)
class Version:
    """Everything diff compares, loaded from one version."""

    label: str
    params: dict[str, Any]  # flattened "section.key" -> value
    subsets: dict[str, list[str]]  # subset name -> ids, in ids.txt order
    scores: dict[str, float]  # id -> sample score
    step_scores: pa.Table | None  # STEP_SCORE_SCHEMA rows, None where the version has none
    segments: pa.Table | None = None  # SEGMENT_COLUMNS of segments.parquet: the step texts
    questions: dict[str, str | None] = dataclasses.field(default_factory=dict)  # id -> select's question key


# ---- reading a version ---------------------------------------------------------------------------
class _DirSource:
    """A plain directory; params from params.yaml in it or its parent (an outputs/ tree's project)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.how_to_get = "give the outputs/ of a run, or a folder of its files"

    def read(self, rel: str) -> bytes | None:
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def subdirs(self, rel: str) -> list[str]:
        path = self.root / rel
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def params(self) -> dict[str, Any]:
        for candidate in (self.root / "params.yaml", self.root.parent / "params.yaml"):
            if candidate.is_file():
                return yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
        return {}


class _DvcSource:
    """One revision of a DVC repository, read with dvc.api (git-tracked and DVC-tracked files alike)."""

    def __init__(self, repo: Path, rev: str | None) -> None:
        import dvc.api
        from dvc.exceptions import DvcException

        self.repo, self.rev = str(repo), rev
        self.how_to_get = ("run `dvc repro` (or `dvc pull` where a remote holds them)" if rev is None else
                           f"run `dvc pull` where a remote holds them, or `git checkout {rev} && dvc repro` "
                           "(then commit dvc.lock), or compare `workspace` or directories")
        self.missing: str | None = None  # the first output DVC names but cannot read (not in its cache)
        try:
            self.fs = dvc.api.DVCFileSystem(self.repo, rev=rev)
            self.fs.repo  # opens the repository and resolves the revision now, to fail with a clear message
        except DvcException as exc:
            raise VersionError(f"{rev!r} is not a directory, nor a revision of the DVC repository {repo}: {exc}") from exc

    def read(self, rel: str) -> bytes | None:
        path = "/" + rel  # absolute within the repo, whatever the current directory
        with self._unless_uncached(rel):
            if not self.fs.isfile(path):
                return None
            with self.fs.open(path, "rb") as handle:
                return handle.read()
        return None

    def subdirs(self, rel: str) -> list[str]:
        path = "/" + rel.rstrip("/")
        with self._unless_uncached(rel):
            if not self.fs.isdir(path):
                return []
            return sorted(Path(e["name"]).name for e in self.fs.ls(path, detail=True) if e["type"] == "directory")
        return []

    @contextlib.contextmanager
    def _unless_uncached(self, rel: str) -> Iterator[None]:
        """dvc.lock names the output, but neither the cache nor a remote holds its bytes (a fresh clone):
        remember the first such path for the one-line error, and read it as absent."""
        from dvc_data.index import DataIndexError

        try:
            yield
        except (FileNotFoundError, DataIndexError):
            self.missing = self.missing or rel

    def params(self) -> dict[str, Any]:
        import dvc.api

        return dvc.api.params_show(repo=self.repo, rev=self.rev)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"score": {"lambda_": 0.5}} -> {"score.lambda_": 0.5}, as `dvc params diff` names params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _first(source, candidates: tuple[str, ...]) -> bytes | None:
    for prefix in ROOT_PREFIXES:
        for rel in candidates:
            data = source.read(prefix + rel)
            if data is not None:
                return data
    return None


def _read_subsets(source) -> dict[str, list[str]]:
    for prefix in ROOT_PREFIXES:
        for rel in SUBSET_DIRS:
            base = f"{prefix}{rel}/" if rel else prefix
            found = {}
            for name in source.subdirs(base):
                data = source.read(f"{base}{name}/ids.txt")
                if data is not None:
                    found[name] = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
            if found:
                return found
    return {}


def load_version(spec: str, repo: Path = Path(".")) -> Version:
    """Load a version named by a directory path, else by a revision of `repo` ("workspace" = working tree)."""
    if Path(spec).is_dir():
        source: _DirSource | _DvcSource = _DirSource(Path(spec))
    else:
        source = _DvcSource(repo, None if spec == "workspace" else spec)
    score_bytes = _first(source, ARTIFACT_PATHS["sample_scores"]) or _first(source, ARTIFACT_PATHS["ranking"])
    subsets = _read_subsets(source)
    if score_bytes is None and not subsets:
        missing = getattr(source, "missing", None)
        where = f"{missing} is in neither the DVC cache nor a remote" if missing else \
            "no sample_scores.parquet, ranking.parquet or subsets/<name>/ids.txt"
        raise VersionError(f"{spec} has no curation outputs ({where}): {source.how_to_get}")
    scores: dict[str, float] = {}
    if score_bytes is not None:
        table = pq.read_table(io.BytesIO(score_bytes), columns=["id", "score"])
        scores = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
    step_bytes = _first(source, ARTIFACT_PATHS["step_scores"])
    step_scores = pq.read_table(io.BytesIO(step_bytes)) if step_bytes is not None else None
    segment_bytes = _first(source, ARTIFACT_PATHS["segments"])
    segments = pq.read_table(io.BytesIO(segment_bytes), columns=SEGMENT_COLUMNS) if segment_bytes is not None else None
    questions: dict[str, str | None] = {}
    ranking_bytes = _first(source, ARTIFACT_PATHS["ranking"])
    if ranking_bytes is not None and "question" in pq.read_schema(io.BytesIO(ranking_bytes)).names:
        ranking = pq.read_table(io.BytesIO(ranking_bytes), columns=["id", "question"])
        questions = dict(zip(ranking.column("id").to_pylist(), ranking.column("question").to_pylist()))
    return Version(spec, flatten(source.params()), subsets, scores, step_scores, segments, questions)


# ---- comparing two versions (pure) ---------------------------------------------------------------
def params_diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Params whose values differ, or that one side lacks (None), sorted by name."""
    return [
        {"param": name, "a": a.get(name), "b": b.get(name)}
        for name in sorted(set(a) | set(b))
        if a.get(name) != b.get(name) or (name in a) != (name in b)
    ]


def subset_diff(name: str, a_ids: list[str], b_ids: list[str]) -> dict[str, Any]:
    """Sizes, ids added (in B only) and removed (in A only), and Jaccard overlap |A & B| / |A | B|."""
    a_set, b_set = set(a_ids), set(b_ids)
    union = a_set | b_set
    return {
        "subset": name,
        "size_a": len(a_ids),
        "size_b": len(b_ids),
        "added": sorted(b_set - a_set),
        "removed": sorted(a_set - b_set),
        "jaccard": len(a_set & b_set) / len(union) if union else None,
    }


def ranks(scores: dict[str, float], ids: list[str]) -> dict[str, int]:
    """1 = best among `ids`; ties broken by id so ranks are deterministic."""
    ordered = sorted(ids, key=lambda i: (-scores[i], i))
    return {id_: position + 1 for position, id_ in enumerate(ordered)}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (tie-aware); None where undefined (under 2 points or constant)."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:  # fewer than 2 points, or a constant side
        return None
    return float(spearmanr(a, b).statistic)


def rows_by_id(table: pa.Table | None, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The rows of `ids` in `table`, grouped by id: one polars semi-join over the whole table rather
    than one scan per id (a diff explains every trace that crossed a boundary, thousands at 10^6)."""
    if table is None or not ids:
        return {}
    wanted = pl.DataFrame({"id": sorted(ids)}, schema={"id": pl.String})
    found: dict[str, list[dict[str, Any]]] = {}
    for row in pl.from_arrow(table).join(wanted, on="id", how="semi").iter_rows(named=True):
        found.setdefault(row["id"], []).append(row)
    return found


def mover_steps(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step of one trace (its step-score rows in A and in B): alpha, consistency, step score side by side."""
    a_steps, b_steps = ({row["step_index"]: row for row in rows} for rows in (a_rows, b_rows))
    steps = []
    for k in sorted(set(a_steps) | set(b_steps)):
        row: dict[str, Any] = {"step_index": k, "step": k + 1}  # step: numbered from 1, as the report does
        for column in STEP_COLUMNS:
            row[f"{column}_a"] = a_steps.get(k, {}).get(column)
            row[f"{column}_b"] = b_steps.get(k, {}).get(column)
        steps.append(row)
    return steps


def step_texts(segment_rows: list[dict[str, Any]]) -> list[str]:
    """The text of each step of one trace, from its segments.parquet row; [] where the version has none."""
    if not segment_rows:
        return []
    row = segment_rows[0]
    return [row["scored_response"][s:e] for s, e in zip(row["step_starts"], row["step_ends"])]


def crossings(a: Version, b: Version) -> list[dict[str, Any]]:
    """Per subset in both versions: the traces in it in one version only, and why (scores, steps).

    Ranks and thresholds are each version's own (rank 1 = best of its scored traces; threshold =
    lowest sample score kept), as select decided membership. Step texts are B's segmentation, or
    A's for a trace B lacks."""
    rank_a, rank_b = ranks(a.scores, list(a.scores)), ranks(b.scores, list(b.scores))
    out = []
    for name in sorted(set(a.subsets) & set(b.subsets)):
        a_ids, b_ids = set(a.subsets[name]), set(b.subsets[name])

        def threshold(version: Version, ids: set[str]) -> float | None:
            kept = [version.scores[i] for i in ids if i in version.scores]
            return min(kept) if kept else None

        thresholds = {"threshold_a": threshold(a, a_ids), "threshold_b": threshold(b, b_ids)}
        moved = [("entered", i) for i in sorted(b_ids - a_ids, key=lambda i: (rank_b.get(i, len(rank_b) + 1), i))]
        moved += [("left", i) for i in sorted(a_ids - b_ids, key=lambda i: (rank_a.get(i, len(rank_a) + 1), i))]
        ids = {id_ for _, id_ in moved}
        steps_a, steps_b = rows_by_id(a.step_scores, ids), rows_by_id(b.step_scores, ids)
        segments_a, segments_b = rows_by_id(a.segments, ids), rows_by_id(b.segments, ids)
        traces = []
        for direction, id_ in moved:
            texts = step_texts(segments_b.get(id_, [])) or step_texts(segments_a.get(id_, []))
            steps = mover_steps(steps_a.get(id_, []), steps_b.get(id_, []))
            for step in steps:
                step["text"] = texts[step["step_index"]] if step["step_index"] < len(texts) else None
            changes = [(abs(s["step_score_b"] - s["step_score_a"]), s["step"]) for s in steps
                       if s["step_score_a"] is not None and s["step_score_b"] is not None]
            traces.append({"id": id_, "direction": direction, "rank_a": rank_a.get(id_), "rank_b": rank_b.get(id_),
                           "score_a": a.scores.get(id_), "score_b": b.scores.get(id_),
                           "most_changed_step": max(changes)[1] if changes else None, "steps": steps})
        out.append({"subset": name, **thresholds, "traces": traces})
    return out


def diff_versions(a: Version, b: Version, top: int = 5) -> dict[str, Any]:
    """The whole comparison as one JSON-ready dict."""
    common = sorted(set(a.scores) & set(b.scores))
    rank_a, rank_b = ranks(a.scores, common), ranks(b.scores, common)
    movers = sorted(common, key=lambda i: (-abs(rank_a[i] - rank_b[i]), i))[:top]
    steps_a, steps_b = rows_by_id(a.step_scores, set(movers)), rows_by_id(b.step_scores, set(movers))
    return {
        "a": a.label,
        "b": b.label,
        "params": params_diff(a.params, b.params),
        "subsets": [
            {**subset_diff(name, a.subsets.get(name, []), b.subsets.get(name, [])),
             # {k: questions with k responses kept}; None where the version's ranking has no question keys
             "per_question_a": per_question([a.questions.get(i) for i in a.subsets.get(name, [])])
             if a.questions else None,
             "per_question_b": per_question([b.questions.get(i) for i in b.subsets.get(name, [])])
             if b.questions else None}
            for name in sorted(set(a.subsets) | set(b.subsets))
        ],
        "scores": {
            "n_a": len(a.scores),
            "n_b": len(b.scores),
            "n_common": len(common),
            "spearman": spearman([a.scores[i] for i in common], [b.scores[i] for i in common]),
        },
        "crossings": crossings(a, b),
        "movers": [
            {
                "id": id_,
                "rank_a": rank_a[id_],
                "rank_b": rank_b[id_],
                "rank_gain": rank_a[id_] - rank_b[id_],  # > 0: B ranks it higher
                "score_a": a.scores[id_],
                "score_b": b.scores[id_],
                "steps": mover_steps(steps_a.get(id_, []), steps_b.get(id_, [])),
            }
            for id_ in movers
            if rank_a[id_] != rank_b[id_]
        ],
    }


# ---- rendering -----------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _id_list(label: str, ids: list[str], max_ids: int) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:max_ids])
    more = f", ... ({len(ids) - max_ids} more)" if len(ids) > max_ids else ""
    return f"- {label} ({len(ids)}): {shown}{more}"


def _cell_text(text: str | None) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= TEXT_WIDTH else flat[: TEXT_WIDTH - 3] + "..."


def _crossings_markdown(result: dict[str, Any], top: int) -> list[str]:
    """Per subset: who entered and who left, and the steps behind it (the first `top` each way)."""
    a, b = result["a"], result["b"]
    out = ["## Subset boundary crossings", ""]
    moved = [c for c in result["crossings"] if c["traces"]]
    if not moved:
        return out + ["No trace entered or left a subset both versions have."]
    for c in moved:
        entered = [t for t in c["traces"] if t["direction"] == "entered"]
        left = [t for t in c["traces"] if t["direction"] == "left"]
        out += [f"### {c['subset']}: {len(entered)} entered, {len(left)} left "
                f"(lowest kept score {_fmt(c['threshold_a'])} -> {_fmt(c['threshold_b'])})"]
        for group in (entered, left):
            for t in group[:top]:
                most = f"; step {t['most_changed_step']} changed most" if t["most_changed_step"] else ""
                out += ["", f"`{t['id']}` {t['direction']}: rank {_fmt(t['rank_a'])} -> {_fmt(t['rank_b'])}, "
                            f"score {_fmt(t['score_a'])} -> {_fmt(t['score_b'])}{most}", ""]
                header = ["step", "text"] + [f"{col} {side}" for col in STEP_COLUMNS for side in (a, b)]
                rows = [[s["step"], _cell_text(s["text"])] + [s[f"{col}_{side}"] for col in STEP_COLUMNS
                                                               for side in ("a", "b")] for s in t["steps"]]
                out += _table(header, rows) if rows else ["No step scores in either version."]
            if len(group) > top:
                out += ["", f"... {len(group) - top} more {group[0]['direction']} (`--top`, or `--json` for all)"]
        out.append("")
    return out


def to_markdown(result: dict[str, Any], max_ids: int = 20, top: int = 5) -> str:
    a, b = result["a"], result["b"]
    out = [f"# grace diff: `{a}` -> `{b}`", "", "## Params", ""]
    if result["params"]:
        out += _table(["Param", a, b], [[p["param"], p["a"], p["b"]] for p in result["params"]])
    else:
        out.append("No param differences.")
    out += ["", "## Subsets", ""]
    out += _table(
        ["Subset", f"size {a}", f"size {b}", "added", "removed", "Jaccard",
         f"responses x questions {a}", f"responses x questions {b}"],
        [[s["subset"], s["size_a"], s["size_b"], len(s["added"]), len(s["removed"]), s["jaccard"],
          per_question_text(s.get("per_question_a")), per_question_text(s.get("per_question_b"))]
         for s in result["subsets"]],
    )
    for s in result["subsets"]:
        if s["added"] or s["removed"]:
            out += ["", f"### {s['subset']}", _id_list("added", s["added"], max_ids),
                    _id_list("removed", s["removed"], max_ids)]
    scores = result["scores"]
    out += ["", "## Sample scores", "",
            f"Scored: {scores['n_a']} in `{a}`, {scores['n_b']} in `{b}`, {scores['n_common']} in both. "
            f"Spearman rank correlation over common ids: {_fmt(scores['spearman'])}.", ""]
    out += _crossings_markdown(result, top)
    out += ["", "## Top movers"]
    if not result["movers"]:
        out += ["", "No rank changes."]
    for m in result["movers"]:
        out += ["", f"### `{m['id']}`: rank {m['rank_a']} -> {m['rank_b']} ({m['rank_gain']:+d}), "
                    f"score {_fmt(m['score_a'])} -> {_fmt(m['score_b'])}", ""]
        header = ["step"] + [f"{c} {side}" for c in STEP_COLUMNS for side in (a, b)]
        rows = [[s["step"]] + [s[f"{c}_{side}"] for c in STEP_COLUMNS for side in ("a", "b")]
                for s in m["steps"]]
        out += _table(header, rows) if rows else ["No step scores in either version."]
    return "\n".join(out)


# ---- command line (tasks.tools.cli registers these) ----------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="version A: a directory, a git revision, a dvc experiment name, or 'workspace'")
    parser.add_argument("b", help="version B, as A")
    parser.add_argument("--repo", default=".", help="the DVC repository revisions refer to (default: .)")
    parser.add_argument("--top", type=int, default=5,
                        help="boundary crossings shown per subset and direction, and top rank movers (default: 5)")
    parser.add_argument("--max-ids", type=int, default=20, help="ids listed per subset in markdown (default: 20)")
    parser.add_argument("--json", action="store_true", help="print JSON (all ids) instead of markdown")


def run(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    try:
        a, b = load_version(args.a, repo), load_version(args.b, repo)
    except VersionError as exc:
        print(f"grace diff: {exc}", file=sys.stderr)
        return 2
    result = diff_versions(a, b, top=args.top)
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else to_markdown(result, args.max_ids,
                                                                                          args.top))
    return 0
