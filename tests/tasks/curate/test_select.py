"""select: ranking, subset sizes, token budget, stratification, files and manifest."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import CLUSTER_SCHEMA, SAMPLE_SCORE_SCHEMA, SEGMENT_SCHEMA
from tasks.core.stage import ParamsError, params_from_dict, write_parquet
from tasks.curate.select import Params, fraction_size, largest_remainder, main, select


def make_records(n: int) -> list[dict]:
    """n input records; `level` gives three strata of unequal size and one record lacks it."""
    records = []
    for i in range(n):
        record = {"id": f"t{i:03d}", "question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}.\n#### {i + 1}"}
        if i != n - 1:
            record["level"] = ["easy", "easy", "medium", "hard", "easy"][i % 5]
        records.append(record)
    return records


def segment_rows(records: list[dict]) -> list[dict]:
    rows = []
    for row, record in enumerate(records):
        response = record["answer"]
        answer_start = response.index("####")
        rows.append({
            "id": record["id"], "source_row": row, "content_hash": hashlib.sha256(response.encode()).hexdigest(),
            "question": record["question"],
            "prompt_messages": json.dumps([{"role": "user", "content": record["question"]}]),
            "response": response, "final_answer": response.rsplit(" ", 1)[-1], "answer_source": "gsm8k",
            "raw": json.dumps(record, ensure_ascii=False), "scored_response": response,
            "step_starts": [0], "step_ends": [answer_start - 1], "answer_start": answer_start,
            "answer_end": len(response), "n_steps": 1,
        })
    return rows


def write_segments(path: Path, records: list[dict]) -> Path:
    write_parquet(path, pa.Table.from_pylist(segment_rows(records), schema=SEGMENT_SCHEMA))
    return path


def write_sample_scores(path: Path, ids: list[str], scores: list[float], n_tokens: list[int],
                        method: str = "grace") -> Path:
    rows = [{"id": i, "score": s, "method": method, "n_steps": 1, "n_tokens": t}
            for i, s, t in zip(ids, scores, n_tokens)]
    write_parquet(path, pa.Table.from_pylist(rows, schema=SAMPLE_SCORE_SCHEMA))
    return path


@pytest.fixture
def inputs(tmp_path):
    records = make_records(40)
    ids = [r["id"] for r in records]
    scores = [round(((i * 37) % 40) / 40, 3) for i in range(40)]  # a permutation of 0..0.975
    scores[5] = scores[6] = scores[7] = 0.5  # a three-way tie
    n_tokens = [10 + (i * 7) % 13 for i in range(40)]
    return {
        "records": records, "ids": ids, "scores": scores, "n_tokens": n_tokens,
        "sample_scores": write_sample_scores(tmp_path / "sample_scores.parquet", ids, scores, n_tokens),
        "segments": write_segments(tmp_path / "segments.parquet", records),
    }


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_fraction_sizes_rounding_and_rank_order(inputs, tmp_path):
    out = tmp_path / "out"
    manifest = select(inputs["sample_scores"], inputs["segments"], out, Params(fractions=(0.05, 0.1, 0.125, 1.0)))
    assert manifest["n_selected"] == {"top5pct": 2, "top10pct": 4, "top12.5pct": 5, "top100pct": 40}
    assert fraction_size(0.05, 1770) == 89  # 88.5 rounds half up, exactly
    assert fraction_size(0.05, 10) == 1  # 0.5 -> 1, and never below 1
    assert fraction_size(0.01, 10) == 1

    ranked = sorted(zip(inputs["scores"], inputs["ids"]),
                    key=lambda pair: (-pair[0], hashlib.sha256(pair[1].encode()).hexdigest()))
    expected = [i for _, i in ranked]
    assert read_lines(out / "subsets" / "top100pct" / "ids.txt") == expected
    assert read_lines(out / "subsets" / "top12.5pct" / "ids.txt") == expected[:5]
    ranking = pq.read_table(out / "subsets" / "ranking.parquet").to_pydict()
    assert ranking["id"] == expected and ranking["rank"] == list(range(1, 41))
    assert ranking["selected_in"][0] == ["top5pct", "top10pct", "top12.5pct", "top100pct"]
    assert ranking["selected_in"][5] == ["top100pct"]
    top10 = manifest["subsets"]["top10pct"]
    assert top10["score_threshold"] == ranked[3][0] and top10["n_total"] == 40 and top10["method"] == "grace"
    assert top10["fraction"] == 0.1


def test_tie_break_does_not_depend_on_input_order(inputs, tmp_path):
    order = list(range(40))[::-1]
    reversed_scores = write_sample_scores(
        tmp_path / "reversed.parquet", [inputs["ids"][i] for i in order], [inputs["scores"][i] for i in order],
        [inputs["n_tokens"][i] for i in order],
    )
    params = Params(fractions=(0.2, 1.0))
    select(inputs["sample_scores"], inputs["segments"], tmp_path / "a", params)
    select(reversed_scores, inputs["segments"], tmp_path / "b", params)
    a_ids = read_lines(tmp_path / "a" / "subsets" / "top100pct" / "ids.txt")
    assert a_ids == read_lines(tmp_path / "b" / "subsets" / "top100pct" / "ids.txt")
    tied = [i for i in a_ids if i in {"t005", "t006", "t007"}]
    assert tied == sorted(tied, key=lambda i: hashlib.sha256(i.encode()).hexdigest())


def test_token_budget_is_a_prefix_that_fits(inputs, tmp_path):
    out = tmp_path / "out"
    manifest = select(inputs["sample_scores"], inputs["segments"], out, Params(fractions=(1.0,), token_budget=100))
    entry = manifest["subsets"]["budget100tok"]
    ranked_ids = read_lines(out / "subsets" / "top100pct" / "ids.txt")
    tokens = dict(zip(inputs["ids"], inputs["n_tokens"]))
    chosen = read_lines(out / "subsets" / "budget100tok" / "ids.txt")
    assert chosen == ranked_ids[: len(chosen)]  # stop at the first overflow: a prefix of the ranking
    assert entry["n_tokens"] == sum(tokens[i] for i in chosen) <= 100
    assert entry["n_tokens"] + tokens[ranked_ids[len(chosen)]] > 100
    assert entry["token_budget"] == 100 and entry["n_selected"] == len(chosen) > 0


def test_stratified_subsets_keep_each_strata_share(inputs, tmp_path):
    out = tmp_path / "out"
    params = Params(fractions=(0.25, 0.5), stratify_by="level")
    manifest = select(inputs["sample_scores"], inputs["segments"], out, params)
    level = {r["id"]: r.get("level", "<missing>") for r in inputs["records"]}
    population = Counter(level.values())
    assert population == {"easy": 23, "medium": 8, "hard": 8, "<missing>": 1}
    ranked_all = pq.read_table(out / "subsets" / "ranking.parquet").to_pydict()["id"]
    for name, size in (("top25pct", 10), ("top50pct", 20)):
        chosen = read_lines(out / "subsets" / name / "ids.txt")
        assert len(chosen) == size == manifest["subsets"][name]["n_selected"]
        counts = Counter(level[i] for i in chosen)
        assert counts == manifest["subsets"][name]["strata"]
        for key in population:  # largest remainder: within one of the exact share, best first inside
            assert abs(counts[key] - size * population[key] / 40) < 1
            assert [i for i in chosen if level[i] == key] == [i for i in ranked_all if level[i] == key][: counts[key]]
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(largest_remainder(7, {"x": 5, "y": 3, "z": 2}).values()) == 7


def test_files_match_records_and_manifest_hashes(inputs, tmp_path):
    out = tmp_path / "out"
    manifest = select(inputs["sample_scores"], inputs["segments"], out, Params(fractions=(0.1, 0.2), token_budget=60))
    by_id = {r["id"]: r for r in inputs["records"]}
    assert set(manifest["subsets"]) == {"top10pct", "top20pct", "budget60tok"}
    for name, entry in manifest["subsets"].items():
        folder = out / "subsets" / name
        ids = read_lines(folder / "ids.txt")
        assert [json.loads(line) for line in read_lines(folder / "subset.jsonl")] == [by_id[i] for i in ids]
        assert entry["sha256_subset_jsonl"] == hashlib.sha256((folder / "subset.jsonl").read_bytes()).hexdigest()
        assert entry["sha256_ids_txt"] == hashlib.sha256((folder / "ids.txt").read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["n_scored"] == 40 and isinstance(manifest["subsets"]["top10pct"]["n_tokens"], int)


def test_outputs_are_byte_identical_and_stale_subsets_go(inputs, tmp_path):
    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    params = Params(fractions=(0.1, 0.2), token_budget=60, stratify_by="level")
    select(inputs["sample_scores"], inputs["segments"], tmp_path / "a", params)
    select(inputs["sample_scores"], inputs["segments"], tmp_path / "b", params)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    select(inputs["sample_scores"], inputs["segments"], tmp_path / "a", Params(fractions=(0.2,)))
    assert sorted(p.name for p in (tmp_path / "a" / "subsets").iterdir()) == ["ranking.parquet", "top20pct"]


def test_selected_id_missing_from_segments_is_an_error(inputs, tmp_path):
    worst = min(zip(inputs["scores"], inputs["ids"]))[1]
    segments = write_segments(tmp_path / "partial.parquet", [r for r in inputs["records"] if r["id"] != worst])
    select(inputs["sample_scores"], segments, tmp_path / "ok", Params(fractions=(0.5,)))  # does not need it
    with pytest.raises(ValueError, match=rf"top100pct: 1 selected ids are not in segments: \['{worst}'\]"):
        select(inputs["sample_scores"], segments, tmp_path / "bad", Params(fractions=(1.0,)))


def test_bad_scores_are_refused(inputs, tmp_path):
    ids = inputs["ids"]
    nan = write_sample_scores(tmp_path / "nan.parquet", ids, [float("nan")] + inputs["scores"][1:], inputs["n_tokens"])
    with pytest.raises(ValueError, match="non-finite score"):
        select(nan, inputs["segments"], tmp_path / "o1", Params())
    duplicated = write_sample_scores(tmp_path / "dup.parquet", ids[:2] + ids[:1], [0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match=r"repeats ids \['t000'\]"):
        select(duplicated, inputs["segments"], tmp_path / "o2", Params())


@pytest.mark.parametrize(
    "values, setting",
    [
        ({"fractions": [0.0]}, "select.fractions"),
        ({"fractions": [1.5]}, "select.fractions"),
        ({"fractions": [0.1, 0.1]}, "select.fractions"),
        ({"token_budget": 0}, "select.token_budget"),
        ({"token_budget": 2.5}, "select.token_budget"),
        ({"fractions": [], "token_budget": None}, "select.fractions"),
        ({"stratify_by": ""}, "select.stratify_by"),
    ],
)
def test_params_check_names_the_setting(values, setting):
    with pytest.raises(ParamsError, match=setting):
        params_from_dict(Params, "select", values)


def test_command_line_reads_params_yaml(inputs, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("select:\n  fractions: [0.25]\n  token_budget: 50\n  stratify_by: null\n")
    out = tmp_path / "out"
    clusters = tmp_path / "clusters.parquet"
    write_parquet(clusters, pa.table({"id": inputs["ids"], "cluster": [i % 3 for i in range(len(inputs["ids"]))]},
                                     schema=CLUSTER_SCHEMA))
    main(["--params", str(params_file), "--sample-scores", str(inputs["sample_scores"]),
          "--segments", str(inputs["segments"]), "--clusters", str(clusters), "--out-dir", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_selected"]["top25pct"] == 10 and "budget50tok" in manifest["subsets"]
    assert manifest["n_clusters"] == 3 and manifest["subsets"]["top25pct"]["n_clusters_covered"] == 3


def test_max_per_question_keeps_the_best_responses_of_each_question(tmp_path):
    # 4 questions x 3 responses (rejection sampling); scores interleave the questions
    records = [{"id": f"q{q}-{k}", "question": f"What is {q} + 1?", "answer": f"It is {q + 1}.\n#### {q + 1}"}
               for q in range(4) for k in range(3)]
    ids = [r["id"] for r in records]
    scores = [float(100 - 7 * i % 12) for i in range(12)]
    sample_scores = write_sample_scores(tmp_path / "scores.parquet", ids, scores, [10] * 12)
    segments = write_segments(tmp_path / "segments.parquet", records)
    manifest = select(sample_scores, segments, tmp_path / "capped", Params(fractions=(0.5, 1.0), max_per_question=2))
    chosen = read_lines(tmp_path / "capped" / "subsets" / "top100pct" / "ids.txt")
    best_two = {i for q in range(4) for i in sorted((i for i in ids if i.startswith(f"q{q}-")),
                                                    key=lambda i: -scores[ids.index(i)])[:2]}
    assert set(chosen) == best_two and manifest["n_capped"] == 4
    assert manifest["subsets"]["top100pct"]["responses_per_question"] == {"2": 4}
    assert manifest["subsets"]["top50pct"]["n_selected"] == 4  # a fraction of the 8 traces left
    assert manifest["responses_per_question"] == {"3": 4}  # of every scored trace
    ranking = pq.read_table(tmp_path / "capped" / "subsets" / "ranking.parquet").to_pylist()
    assert len({r["question"] for r in ranking}) == 4 and all(len(r["question"]) == 16 for r in ranking)
    uncapped = select(sample_scores, segments, tmp_path / "all", Params(fractions=(1.0,)))
    assert uncapped["n_capped"] == 0 and uncapped["subsets"]["top100pct"]["responses_per_question"] == {"3": 4}
    with pytest.raises(ParamsError, match="select.max_per_question"):
        params_from_dict(Params, "select", {"max_per_question": 0})
