"""finetune_eval: every method's subsets through aggregate + select; fine-tune, evaluate, cache, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.artifacts import read_extract
from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate import aggregate, cluster, extract, ingest, score, select
from tasks.finetune.runs import evaluation_problems, run_all, run_key
from tasks.finetune.runs import main as runs_main
from tasks.finetune.subsets import Params, build_subsets, main
from tests.conftest import GSM_ROWS
from tests.params_yaml import defaults_are_the_section
from tests.tasks.tiny_pipeline import build_extract, build_segments

MORE_ROWS = [{"id": f"gsm-{i}", "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
              "answer": f"Tom starts with {a} apples.\n" + "He buys more.\n" * (i % 3) +
                        f"So he has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
             for i, (a, b) in enumerate([(3, 4), (10, 5), (7, 7), (21, 9), (6, 1)])]
TEST_ROWS = [{"id": f"test-{i}", "question": f"Ann has {i} pens and gets {i} more. How many pens?",
              "answer": f"She has {i}+{i} = <<{i}+{i}={2 * i}>>{2 * i} pens.\n#### {2 * i}"} for i in (2, 5, 8)]


@pytest.fixture(scope="module")
def curation(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Real ingest -> segment -> extract -> score outputs for eight traces, and an ingested test set."""
    root = tmp_path_factory.mktemp("curation")
    segments = build_segments(root, [dict(row) for row in GSM_ROWS] + MORE_ROWS)
    extract_dir = build_extract(root, segments, tiny_model_dir)
    score.score(extract_dir, root / "score", score.Params())
    cluster.cluster(extract_dir, root / "cluster", cluster.Params(n_clusters=3))
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in TEST_ROWS), encoding="utf-8")
    ingest.ingest(root / "test.jsonl", root / "test", ingest.Params())
    return {"segments": segments, "extract": extract_dir, "step_scores": root / "score" / "step_scores.parquet",
            "test": root / "test" / "traces.parquet", "model": tiny_model_dir,
            "clusters": root / "cluster" / "clusters.parquet"}


def subsets(curation: dict, out_dir: Path, params: Params, scorers: Path | None = None,
            warmup: Path | None = None) -> dict:
    return build_subsets(curation["step_scores"], curation["extract"], out_dir / "no-unconditional.parquet",
                         curation["segments"], curation["clusters"], scorers or out_dir / "no-scorers",
                         warmup or out_dir / "no-warmup", out_dir, params, score.Params(), aggregate.Params(),
                         select.Params())


def test_every_method_goes_through_aggregate_and_select(curation, tmp_path):
    params = Params(methods=("grace", "random", "length"), random_seeds=(0, 1), fractions=(0.25, 0.5),
                    variants=(), token_matched_random=False)
    assert subsets(curation, tmp_path, params) == {"runs": 10}
    runs = json.loads((tmp_path / "index.json").read_text())["runs"]
    assert [run["name"] for run in runs] == [
        "base", "grace-top25pct", "grace-top50pct", "random-seed0-top25pct", "random-seed0-top50pct",
        "random-seed1-top25pct", "random-seed1-top50pct", "length-top25pct", "length-top50pct", "full"]
    assert {run["train_seed"] for run in runs if run["method"] == "random"} == {0, 1}  # each seed trains with its own
    ids = {run["name"]: (tmp_path / run["ids"]).read_text().split() for run in runs if run["ids"]}
    assert {name: len(value) for name, value in ids.items() if name.endswith("25pct")} == {
        "grace-top25pct": 2, "random-seed0-top25pct": 2, "random-seed1-top25pct": 2, "length-top25pct": 2}
    table = read_extract(curation["extract"])
    tokens = {row["id"]: sum(row["span_token_counts"]) for row in table.to_pylist()}
    assert sorted(ids["full"]) == sorted(tokens)  # full = the whole scored pool
    longest = sorted(tokens, key=lambda i: -tokens[i])[:4]
    assert set(ids["length-top50pct"]) == set(longest) and min(tokens[i] for i in longest) > sorted(tokens.values())[3]
    seeds = [pq.read_table(tmp_path / f"random-seed{s}" / "aggregate" / "sample_scores.parquet").to_pylist()
             for s in (0, 1)]
    assert seeds[0] != seeds[1]  # each seed its own random scores
    grace = pq.read_table(tmp_path / "grace" / "aggregate" / "sample_scores.parquet")
    assert grace["id"].to_pylist()[:2] == ids["grace-top25pct"]  # best first, as select writes it


def test_evaluation_problems_are_sorted_by_id_and_parsed(tmp_path):
    rows = [{"id": f"p{i}", "prompt_messages": json.dumps([{"role": "user", "content": str(i)}]),
             "final_answer": str(i)} for i in (9, 0, 1, 2, 3, 4, 5, 6, 7, 8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    problems = evaluation_problems(tmp_path / "t.parquet")
    assert [p["id"] for p in problems] == [f"p{i}" for i in range(10)]
    assert problems[3]["prompt_messages"] == [{"role": "user", "content": "3"}]
    rows[4]["final_answer"] = ""  # ingest keeps a response with no answer marker; a test problem needs one
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"1 held-out problems have no gold answer .*\['p3'\]"):
        evaluation_problems(tmp_path / "t.parquet")


def test_run_key_changes_with_what_the_numbers_depend_on():
    pool = [{"id": "a", "content_hash": "1"}, {"id": "b", "content_hash": "2"}]
    problems = [{"id": "t", "content_hash": "3", "final_answer": "4"}]
    params, patterns = Params(), ("gsm8k",)
    key = run_key(pool, problems, params, "model-1", "cpu", patterns)
    assert key == run_key([dict(r) for r in pool], problems, dataclasses.replace(params, methods=("grace",)),
                          "model-1", "cpu", patterns)  # which other runs exist does not matter
    assert key == run_key(pool, problems, dataclasses.replace(params, variants=(), scorers={}),
                          "model-1", "cpu", patterns)  # nor which variants the table has
    for changed in (run_key(pool[:1], problems, params, "model-1", "cpu", patterns),
                    run_key([pool[0], {"id": "b", "content_hash": "edited"}], problems, params, "model-1", "cpu",
                            patterns),
                    run_key(pool, problems, dataclasses.replace(params, learning_rate=0.1), "model-1", "cpu", patterns),
                    run_key(pool, problems, params, "model-2", "cpu", patterns),
                    run_key(pool, problems, params, "model-1", "cuda", patterns),
                    run_key(pool, problems, params, "model-1", "cpu", ("boxed",))):
        assert changed != key
    assert key != run_key(pool, problems, dataclasses.replace(params, seed=1), "model-1", "cpu", patterns)  # a run's
    # own training seed; repeats and the calibration settings only decide which runs exist
    assert key == run_key(pool, problems, dataclasses.replace(params, repeats=3, calibration=False, budget="tokens",
                                                              dose_shares=()), "model-1", "cpu", patterns)
    assert key != run_key(pool, problems, dataclasses.replace(params, steps=50), "model-1", "cpu", patterns)
    base = run_key(None, problems, params, "model-1", "cpu", patterns)
    assert base == run_key(None, problems, dataclasses.replace(params, learning_rate=0.1), "model-1", "cpu", patterns)
    assert base != run_key(None, problems, dataclasses.replace(params, max_new_tokens=7), "model-1", "cpu", patterns)


def test_runs_fine_tune_evaluate_and_resume_from_the_cache(curation, tmp_path):
    params = Params(methods=("grace",), fractions=(0.5,), variants=(), lora_layers=1, batch_tokens=256, accuracy_problems=2,
                    max_new_tokens=4, eval_batch_size=2, device="cpu", cache_dir=str(tmp_path / "cache"))
    subsets(curation, tmp_path / "subsets", params)
    paths = dict(subsets=tmp_path / "subsets", segments=curation["segments"], test=curation["test"],
                 model=curation["model"], out_dir=tmp_path / "runs")
    first = run_all(**paths, params=params, ingest=ingest.Params())
    assert first["runs"] == ["base", "grace-top50pct", "full"] and (first["trained"], first["from_cache"]) == (3, 0)
    assert first["trunk_cache"]  # LoRA on the last of two layers: the first is computed once for all runs
    records = {name: json.loads((tmp_path / "runs" / f"{name}.json").read_text()) for name in first["runs"]}
    assert [records[n]["n_train"] for n in first["runs"]] == [0, 4, 8]
    assert records["base"]["train"] is None and records["full"]["train"]["steps"] >= 1
    assert all(r["eval"]["n_problems"] == 3 and len(r["eval"]["predictions"]) == 2 for r in records.values())
    # An interruption during the grace run: its result never reached the cache.
    (tmp_path / "cache" / f"{records['grace-top50pct']['key']}.json").unlink()
    second = run_all(**paths, params=params, ingest=ingest.Params())
    assert (second["trained"], second["from_cache"]) == (1, 2)
    rerun = json.loads((tmp_path / "runs" / "grace-top50pct.json").read_text())
    for record in (rerun, records["grace-top50pct"]):
        record["train"].pop("seconds"), record["eval"].pop("seconds")
    assert rerun == records["grace-top50pct"]  # deterministic: the retrained run gives the same numbers
    params_file = tmp_path / "params.yaml"
    section = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
    params_file.write_text(yaml.safe_dump({"finetune_eval": section}))
    third = runs_main(["--params", str(params_file), *[f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]])
    assert (third["trained"], third["from_cache"]) == (0, 3)


@pytest.mark.parametrize("key, value, message", [
    ("methods", ["grace", "bogus"], "finetune_eval.methods"),
    ("methods", ["full"], "finetune_eval.methods"),  # full is always run, never a method
    ("fractions", [0.5, 1.0], "finetune_eval.fractions"),
    ("mode", "qlora", "finetune_eval.mode"),
    ("lora_layers", 0, "finetune_eval.lora_layers"),
    ("accuracy_problems", 0, "finetune_eval.accuracy_problems"),
    ("device", "tpu", "finetune_eval.device"),
    ("batch_tokens", 0, "finetune_eval.batch_tokens"),
    ("learning_rate", "2e-4", "finetune_eval.learning_rate"),  # YAML 1.1 reads 2e-4 as text
    ("fractions", [0.2, 0.2], "finetune_eval.fractions"),
])
def test_params_name_the_setting_at_fault(key, value, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(Params, "finetune_eval", {key: value})


def test_params_defaults_are_the_params_yaml_section(tmp_path):
    assert defaults_are_the_section(Params, "finetune_eval", tmp_path)


def test_subsets_cli_reads_its_sections(curation, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"finetune_eval": {"methods": ["length"], "fractions": [0.5],
                                                             "include_base": False, "variants": [],
                                                             "scorers": {}},
                                           "select": {"stratify_by": "nonexistent_field"}}))
    stats = main(["--params", str(params_file), "--step-scores", str(curation["step_scores"]),
                  "--extract", str(curation["extract"]), "--unconditional", str(tmp_path / "none.parquet"),
                  "--segments", str(curation["segments"]), "--clusters", str(curation["clusters"]),
                  "--scorers", str(tmp_path / "scorers"), "--warmup", str(tmp_path / "warmup"),
                  "--out-dir", str(tmp_path / "out")])
    runs = json.loads((tmp_path / "out" / "index.json").read_text())["runs"]
    assert stats == {"runs": 2} and [run["name"] for run in runs] == ["length-top50pct", "full"]
    manifest = json.loads((tmp_path / "out" / "length" / "select" / "manifest.json").read_text())
    assert "nonexistent_field" in json.dumps(manifest)  # select's own section reached select


def test_variants_score_their_own_way_and_record_coverage_and_warmup_overlap(curation, tmp_path):
    """A within-cluster variant, a head-gradient variant and a warmed scorer on a pool of 6 of the 8 traces."""
    from tasks.finetune import warmup
    from tasks.finetune.scorers import build_scorers

    params = Params(methods=("grace",), fractions=(0.25,), scorers={"warm": {"model": "warmup", "pool": 6}},
                    variants=({"name": "grace-clusters", "within_clusters": True},
                              {"name": "grace-head", "gradient": "head"},
                              {"name": "grace-warm", "scorer": "warm"}))
    warmup.warmup(curation["segments"], curation["model"], tmp_path / "warmup", warmup.Params(fraction=0.25))
    built = build_scorers(curation["segments"], curation["model"], tmp_path / "warmup", tmp_path / "scorers",
                          params, extract.Params(cache_dir=None))
    assert built["warm"]["read"] == 6
    assert subsets(curation, tmp_path / "out", params, tmp_path / "scorers", tmp_path / "warmup") == {"runs": 6}
    runs = {run["name"]: run for run in json.loads((tmp_path / "out" / "index.json").read_text())["runs"]}
    assert list(runs) == ["base", "grace-top25pct", "full", "grace-clusters-top25pct", "grace-head-top25pct",
                          "grace-warm-top25pct"]
    ids = {name: (tmp_path / "out" / run["ids"]).read_text().split() for name, run in runs.items() if run["ids"]}
    assert {name: len(value) for name, value in ids.items()} == {
        "grace-top25pct": 2, "full": 8, "grace-clusters-top25pct": 2, "grace-head-top25pct": 2,
        "grace-warm-top25pct": 2}  # the pooled scorer keeps as many traces as every other row
    assert runs["grace-clusters-top25pct"]["method"] == "grace-clusters"  # a row of its own in the table
    assert runs["grace-clusters-top25pct"]["variant"]["within_clusters"] is True
    assert runs["grace-clusters-top25pct"]["n_clusters_covered"] == 2  # two traces, two of the three clusters
    assert runs["grace-warm-top25pct"]["n_scored"] == 6
    warmed_on = set((tmp_path / "warmup" / "ids.txt").read_text().split())
    assert runs["grace-warm-top25pct"]["warmup_overlap"] == len(set(ids["grace-warm-top25pct"]) & warmed_on)
    pool = set(pq.read_table(tmp_path / "scorers" / "warm" / "segments.parquet").column("id").to_pylist())
    assert set(ids["grace-warm-top25pct"]) <= pool
    head = pq.read_table(tmp_path / "out" / "grace-head" / "aggregate" / "sample_scores.parquet")
    plain = pq.read_table(tmp_path / "out" / "grace" / "aggregate" / "sample_scores.parquet")
    assert head.column("score").to_pylist() != plain.column("score").to_pylist()  # its own gradient source


@pytest.mark.parametrize("values, message", [
    ({"variants": [{"name": "grace"}]}, "finetune_eval.variants"),  # a method's own row name
    ({"variants": [{"name": "x", "scorer": "missing"}]}, "finetune_eval.variants"),
    ({"variants": [{"name": "x", "colour": "red"}]}, "finetune_eval.variants"),
    ({"scorers": {"base": {}}}, "finetune_eval.scorers"),
    ({"scorers": {"w": {"model": "other"}}}, "finetune_eval.scorers"),
    ({"scorers": {"w": {"pool": 0}}}, "finetune_eval.scorers"),
])
def test_variant_params_name_the_setting(values, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(Params, "finetune_eval", {"variants": [], "scorers": {}, **values})


def test_token_matched_rows_and_budget_tokens(curation, tmp_path):
    """random-tokens rows (budget samples) and every row under budget tokens hold the fraction's share of the pool's
    response tokens, as a prefix of their ranking (select's token budget)."""
    table = read_extract(curation["extract"])
    tokens = {row["id"]: sum(row["span_token_counts"]) for row in table.to_pylist()}
    pool_tokens = sum(tokens.values())
    params = Params(methods=("random", "length"), random_seeds=(0,), fractions=(0.5,), variants=(), include_base=False)
    subsets(curation, tmp_path / "samples", params)
    runs = {run["name"]: run for run in json.loads((tmp_path / "samples" / "index.json").read_text())["runs"]}
    assert set(runs) == {"random-seed0-top50pct", "length-top50pct", "full", "random-tokens-seed0-top50pct"}
    matched = (tmp_path / "samples" / runs["random-tokens-seed0-top50pct"]["ids"]).read_text().split()
    assert sum(tokens[i] for i in matched) <= round(0.5 * pool_tokens) < sum(tokens[i] for i in matched) + max(
        tokens.values())
    subsets(curation, tmp_path / "tokens", dataclasses.replace(params, budget="tokens"))
    runs = {run["name"]: run for run in json.loads((tmp_path / "tokens" / "index.json").read_text())["runs"]}
    assert "random-tokens-seed0-top50pct" not in runs  # every row is token-matched already
    longest = (tmp_path / "tokens" / runs["length-top50pct"]["ids"]).read_text().split()
    assert sum(tokens[i] for i in longest) <= round(0.5 * pool_tokens)
    assert len(longest) < len(matched)  # the longest traces fill the budget with fewer of them


def test_calibration_rows_draw_from_the_labels(curation, tmp_path):
    """oracle = clean traces only, anti-oracle = corrupted only, doseNN = NN% clean; repeats train a deterministic
    row once per training seed; a pool larger than its clean traces refuses an oracle fraction it cannot fill."""
    ids = sorted(pq.read_table(curation["segments"], columns=["id"])["id"].to_pylist())
    corrupted = set(ids[::2])
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": i, "corrupted": i in corrupted}) + "\n" for i in ids))
    params = Params(methods=("length",), random_seeds=(0, 1), fractions=(0.25,), variants=(), include_base=False,
                    repeats=2, dose_shares=(0.5,), dose_fraction=0.5)
    build_subsets(curation["step_scores"], curation["extract"], tmp_path / "none.parquet", curation["segments"],
                  curation["clusters"], tmp_path / "s", tmp_path / "w", tmp_path / "out", params, score.Params(),
                  aggregate.Params(), select.Params(), labels=labels)
    runs = json.loads((tmp_path / "out" / "index.json").read_text())["runs"]
    held = {run["name"]: set((tmp_path / "out" / run["ids"]).read_text().split()) for run in runs}
    by_row: dict[str, list[dict]] = {}
    for run in runs:
        by_row.setdefault(run["method"], []).append(run)
    assert {run["name"]: run["train_seed"] for run in by_row["length"]} == {"length-seed0-top25pct": 0,
                                                                           "length-seed1-top25pct": 1}
    assert [run["name"] for run in by_row["full"]] == ["full-seed0", "full-seed1"]
    for run in by_row["oracle"]:
        assert held[run["name"]] and not held[run["name"]] & corrupted and run["clean_share"] == 1
    assert {run["fraction"] for run in by_row["oracle"]} == {0.25, 0.5}  # also at the dose budget
    for run in by_row["anti-oracle"]:
        assert held[run["name"]] <= corrupted and run["clean_share"] == 0
    assert [len(held[run["name"]]) for run in by_row["dose50"]] == [len(ids) // 2] * 2
    assert all(run["clean_share"] == 0.5 for run in by_row["dose50"])
    assert held["oracle-seed0-top25pct"] != held["oracle-seed1-top25pct"]  # each seed its own draw
    with pytest.raises(ParamsError, match="more traces than"):
        build_subsets(curation["step_scores"], curation["extract"], tmp_path / "none.parquet", curation["segments"],
                      curation["clusters"], tmp_path / "s", tmp_path / "w", tmp_path / "out2",
                      dataclasses.replace(params, fractions=(0.75,), dose_fraction=None), score.Params(),
                      aggregate.Params(), select.Params(), labels=labels)
@pytest.mark.parametrize("values, message", [
    ({"variants": [{"nme": "a"}]}, r"entry \{'nme': 'a'\}: unknown key\(s\) \['nme'\]"),  # not "distinct names"
    ({"variants": [{"name": "p", "gradient": "projected", "scorer": "w"}], "scorers": {"w": {"projected": False}}},
     "gradient projected needs projected Grams, which scorer w does not extract; set "
     "finetune_eval.scorers.w.projected: true"),
    ({"lora_targets": []}, "finetune_eval.lora_targets"),
])
def test_variant_params_that_would_fail_later_are_refused_at_once(values, message):
    with pytest.raises(ParamsError, match=message):
        params_from_dict(Params, "finetune_eval", {"variants": [], "scorers": {}, **values})


def test_a_projected_variant_on_an_extract_without_projected_grams_stops_before_any_run(curation, tmp_path):
    """The curation's extract (scorer base) ran without extract.projected: one line, before any subset is built."""
    from tasks.core.stage import StageInputError

    params = Params(methods=("grace",), fractions=(0.25,), scorers={},
                    variants=({"name": "grace-projected", "gradient": "projected"},))
    with pytest.raises(StageInputError, match="finetune_eval.variants: grace-projected uses gradient projected on "
                                              "scorer base, whose extract .* has no projected_gram for 8 traces; "
                                              "set extract.projected: true"):
        subsets(curation, tmp_path / "out", params)
    assert not (tmp_path / "out" / "grace").exists()  # stopped at the start, not after the other methods
