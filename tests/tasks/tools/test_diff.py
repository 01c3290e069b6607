"""grace diff: two revisions and an experiment of a real git+DVC repo, and two plain directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from scipy.stats import spearmanr

from tasks.tools import cli
from tasks.tools.diff import diff_versions, load_version, params_diff, ranks, spearman, subset_diff
from tests.tasks.outputs_tree import build_outputs, dvc, git, init_pipeline_repo, write_params


def snapshot(outputs: Path) -> dict:
    """What the workspace holds now, read directly (not through DVC): the expected side of the checks."""
    scores = pq.read_table(outputs / "aggregate/sample_scores.parquet").to_pydict()
    steps = pq.read_table(outputs / "score/step_scores.parquet").to_pylist()
    return {
        "scores": dict(zip(scores["id"], scores["score"])),
        "subsets": {p.parent.name: p.read_text().split() for p in (outputs / "select/subsets").glob("*/ids.txt")},
        "steps": {(r["id"], r["step_index"]): r for r in steps},
    }


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Commit v1 (lambda 0.5), commit v2 (lambda 0.9, other fractions), then experiment `lam02`."""
    repo = tmp_path_factory.mktemp("diff") / "repo"
    init_pipeline_repo(repo, 0.5, [0.1, 0.2])
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    v1 = snapshot(repo / "outputs")
    write_params(repo, 0.9, [0.1, 0.25])
    dvc(repo, "repro", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v2")
    v2 = snapshot(repo / "outputs")
    dvc(repo, "exp", "run", "-q", "-n", "lam02", "-S", "score.lambda_=0.2")
    exp = snapshot(repo / "outputs")
    return {"repo": repo, "v1": v1, "v2": v2, "exp": exp}


def run_cli(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def check_against(result: dict, a: dict, b: dict) -> None:
    """Every number of a diff result, recomputed from the two snapshots."""
    names = sorted(set(a["subsets"]) | set(b["subsets"]))
    assert [s["subset"] for s in result["subsets"]] == names
    for s in result["subsets"]:
        a_ids, b_ids = set(a["subsets"].get(s["subset"], [])), set(b["subsets"].get(s["subset"], []))
        assert (s["size_a"], s["size_b"]) == (len(a_ids), len(b_ids))
        assert s["added"] == sorted(b_ids - a_ids) and s["removed"] == sorted(a_ids - b_ids)
        assert s["jaccard"] == pytest.approx(len(a_ids & b_ids) / len(a_ids | b_ids))
    common = sorted(set(a["scores"]) & set(b["scores"]))
    expected_rho = spearmanr([a["scores"][i] for i in common], [b["scores"][i] for i in common]).statistic
    assert result["scores"]["n_common"] == len(common)
    assert result["scores"]["spearman"] == pytest.approx(expected_rho)
    top = result["movers"][0]
    rank_a, rank_b = ranks(a["scores"], common), ranks(b["scores"], common)
    assert abs(top["rank_gain"]) == max(abs(rank_a[i] - rank_b[i]) for i in common)
    assert (top["rank_a"], top["rank_b"]) == (rank_a[top["id"]], rank_b[top["id"]])
    for step in top["steps"]:
        key = (top["id"], step["step_index"])
        for column in ("alpha", "consistency", "step_score"):
            assert step[f"{column}_a"] == pytest.approx(a["steps"][key][column])
            assert step[f"{column}_b"] == pytest.approx(b["steps"][key][column])


def test_diff_of_two_revisions_reads_each_revision_through_dvc(history, capsys):
    repo = history["repo"]
    result = json.loads(run_cli(["diff", "HEAD~1", "HEAD", "--repo", str(repo), "--json"], capsys))
    assert result["params"] == [
        {"param": "score.lambda_", "a": 0.5, "b": 0.9},
        {"param": "select.fractions", "a": [0.1, 0.2], "b": [0.1, 0.25]},
    ]
    # HEAD~1's outputs are no longer in the workspace: they can only have come from the DVC cache.
    check_against(result, history["v1"], history["v2"])
    assert {s["subset"] for s in result["subsets"]} == {"top10pct", "top20pct", "top25pct"}
    assert result["scores"]["spearman"] < 1  # lambda moved traces, so the test below has movers to explain


def test_diff_markdown_shows_params_subsets_and_mover_steps(history, capsys):
    text = run_cli(["diff", "HEAD~1", "HEAD", "--repo", str(history["repo"]), "--top", "2"], capsys)
    assert "| score.lambda_ | 0.5 | 0.9 |" in text
    assert "| top20pct | 6 | 0 | 0 | 6 | 0 |" in text  # subset dropped in B: all removed, no overlap
    assert text.count("rank ") >= 2 and "| step | alpha HEAD~1 | alpha HEAD |" in text


def test_diff_accepts_a_dvc_experiment_name(history, capsys):
    repo = history["repo"]
    result = json.loads(run_cli(["diff", "HEAD", "lam02", "--repo", str(repo), "--json"], capsys))
    assert result["params"] == [{"param": "score.lambda_", "a": 0.9, "b": 0.2}]
    check_against(result, history["v2"], history["exp"])
    # `dvc exp run` left the experiment's results in the workspace: the two must be identical.
    same = diff_versions(load_version("lam02", repo), load_version("workspace", repo))
    assert same["params"] == [] and same["movers"] == [] and same["scores"]["spearman"] == pytest.approx(1.0)
    assert all(s["jaccard"] == 1 for s in same["subsets"])


def test_unknown_version_is_a_clear_error(history, capsys):
    assert cli.main(["diff", "no-such-rev", "HEAD", "--repo", str(history["repo"])]) == 2
    assert "'no-such-rev' is not a directory, nor a revision" in capsys.readouterr().err


def test_a_fresh_clone_without_outputs_is_one_line_saying_how_to_get_them(history, tmp_path, capsys):
    """The README's `grace diff HEAD~1 HEAD` in a fresh clone: dvc.lock names outputs its empty cache lacks."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(history["repo"]), str(clone))
    assert cli.main(["diff", "HEAD~1", "HEAD", "--repo", str(clone)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("grace diff: HEAD~1 has no curation outputs (outputs/")
    assert "is in neither the DVC cache nor a remote" in line and "`git checkout HEAD~1 && dvc repro`" in line
    (tmp_path / "empty").mkdir()
    assert cli.main(["diff", str(tmp_path / "empty"), "HEAD", "--repo", str(history["repo"])]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == (f"grace diff: {tmp_path / 'empty'} has no curation outputs (no sample_scores.parquet, "
                    "ranking.parquet or subsets/<name>/ids.txt): give the outputs/ of a run, or a folder of its files")


def test_diff_of_two_plain_directories(tmp_path, capsys):
    """An outputs/ tree (params.yaml beside it) against a flat folder of copied files."""
    a = build_outputs(tmp_path / "proj/outputs", n=30, lambda_=0.5, fractions=(0.1, 0.2))
    (tmp_path / "proj/params.yaml").write_text(yaml.safe_dump({"score": {"lambda_": 0.5}}))
    b_tree = tmp_path / "b_tree"
    b = build_outputs(b_tree, n=34, lambda_=0.7, fractions=(0.1, 0.2))
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(b_tree / "aggregate/sample_scores.parquet", flat)
    shutil.copy(b_tree / "score/step_scores.parquet", flat)
    shutil.copytree(b_tree / "select/subsets", flat, dirs_exist_ok=True)
    (flat / "params.yaml").write_text(yaml.safe_dump({"score": {"lambda_": 0.7}}))
    result = json.loads(run_cli(["diff", str(tmp_path / "proj/outputs"), str(flat), "--json"], capsys))
    assert result["params"] == [{"param": "score.lambda_", "a": 0.5, "b": 0.7}]
    assert result["scores"]["n_a"] == 30 and result["scores"]["n_b"] == 34
    check_against(result, snapshot(tmp_path / "proj/outputs"), snapshot(b_tree))
    assert a["subsets"]["top10pct"] == load_version(str(tmp_path / "proj/outputs")).subsets["top10pct"]
    assert b["subsets"]["top20pct"] == load_version(str(flat)).subsets["top20pct"]


def test_pure_parts():
    assert params_diff({"a.x": 1, "a.y": [1]}, {"a.x": 1, "a.y": [2], "b": None}) == [
        {"param": "a.y", "a": [1], "b": [2]},
        {"param": "b", "a": None, "b": None},  # present on one side only, even with a null value
    ]
    s = subset_diff("s", ["x", "y", "z"], ["y", "z", "w", "v"])
    assert (s["added"], s["removed"], s["jaccard"]) == (["v", "w"], ["x"], 2 / 5)
    assert subset_diff("s", [], [])["jaccard"] is None
    assert ranks({"b": 1.0, "a": 1.0, "c": 2.0}, ["a", "b", "c"]) == {"c": 1, "a": 2, "b": 3}
    assert spearman([1.0, 1.0], [1.0, 2.0]) is None and spearman([1.0], [2.0]) is None


def test_traces_crossing_a_subset_boundary_are_explained_with_their_steps(tmp_path, capsys):
    """Same traces, lambda 0.5 -> 0.95: subsets change members; each crosser comes with its step texts and numbers."""
    a = build_outputs(tmp_path / "a/outputs", n=30, lambda_=0.5, fractions=(0.1, 0.2))
    b = build_outputs(tmp_path / "b/outputs", n=30, lambda_=0.95, fractions=(0.1, 0.2))
    result = json.loads(run_cli(["diff", str(tmp_path / "a/outputs"), str(tmp_path / "b/outputs"), "--json"], capsys))
    segments = {r["id"]: r for r in pq.read_table(tmp_path / "b/outputs/segment/segments.parquet").to_pylist()}
    steps_b = snapshot(tmp_path / "b/outputs")["steps"]
    crossed = 0
    for c in result["crossings"]:
        a_ids, b_ids = set(a["subsets"][c["subset"]]), set(b["subsets"][c["subset"]])
        assert {t["id"] for t in c["traces"] if t["direction"] == "entered"} == b_ids - a_ids
        assert {t["id"] for t in c["traces"] if t["direction"] == "left"} == a_ids - b_ids
        assert c["threshold_a"] == min(a["scores"][i] for i in a_ids)
        assert c["threshold_b"] == min(b["scores"][i] for i in b_ids)
        for t in c["traces"]:
            crossed += 1
            inside, outside = ("b", "a") if t["direction"] == "entered" else ("a", "b")
            assert t[f"score_{inside}"] >= c[f"threshold_{inside}"] and t[f"score_{outside}"] < c[f"threshold_{outside}"]
            row = segments[t["id"]]
            assert [s["step"] for s in t["steps"]] == list(range(1, len(row["step_starts"]) + 1))
            for s in t["steps"]:
                assert s["text"] == row["scored_response"][row["step_starts"][s["step_index"]]:row["step_ends"][s["step_index"]]]
                assert s["step_score_b"] == pytest.approx(steps_b[(t["id"], s["step_index"])]["step_score"])
    assert crossed > 0, "lambda 0.5 -> 0.95 should move some trace across a boundary"

    text = run_cli(["diff", str(tmp_path / "a/outputs"), str(tmp_path / "b/outputs"), "--top", "1"], capsys)
    first = next(c for c in result["crossings"] if c["traces"])
    entered = sum(t["direction"] == "entered" for t in first["traces"])
    assert f"### {first['subset']}: {entered} entered, {len(first['traces']) - entered} left" in text
    t = first["traces"][0]
    assert f"`{t['id']}` {t['direction']}: rank {t['rank_a']} -> {t['rank_b']}" in text
    assert f"| 1 | Step 1: {t['id']} adds 0 + 0 = 0. |" in text  # step 1 is the first step, as in the report


def test_responses_kept_per_question_on_each_side():
    from tasks.tools.diff import Version, to_markdown

    questions = {"a1": "qa", "a2": "qa", "a3": "qa", "b1": "qb", "c1": "qc"}
    a = Version("A", {}, {"top": ["a1", "a2", "a3", "b1"]}, {i: 1.0 for i in questions}, None, questions=questions)
    b = Version("B", {}, {"top": ["a1", "b1", "c1"]}, {i: 1.0 for i in questions}, None,
                questions=questions)
    (subset,) = diff_versions(a, b)["subsets"]
    assert (subset["per_question_a"], subset["per_question_b"]) == ({"1": 1, "3": 1}, {"1": 3})
    assert "| top | 4 | 3 | 1 | 2 | 0.4 | 1 x 1, 3 x 1 | 1 x 3 |" in to_markdown(diff_versions(a, b))
    # a version whose ranking predates question keys shows none, rather than a wrong count
    old = Version("old", {}, {"top": ["a1"]}, {"a1": 1.0}, None)
    assert diff_versions(old, b)["subsets"][0]["per_question_a"] is None
