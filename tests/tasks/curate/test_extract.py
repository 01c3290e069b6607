"""The extract stage: shards, resume, byte-identity, cache, quarantine, CLI (tiny models, inline data)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.artifacts import read_extract
from tasks.core.schema import EXTRACT_SCHEMA, SEGMENT_SCHEMA, content_hash
from tasks.core.stage import read_quarantine
from tasks.curate.extract import (PACK_SCHEMA, PackCache, Params, extract, extract_shard, finalize, load_model, main,
                                  plan_shards, trace_key)
from tests.params_yaml import defaults_are_the_section

SHARD = 3


def line_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def segment_row(index: int, trace_id: str, question: str, response: str, spans=None) -> dict:
    prompt = json.dumps([{"role": "user", "content": question}], ensure_ascii=False)
    *steps, answer = spans or line_spans(response)
    return {"id": trace_id, "source_row": index, "content_hash": content_hash(prompt, response), "question": question,
            "prompt_messages": prompt, "response": response, "final_answer": "", "answer_source": "gsm8k",
            "raw": "{}", "scored_response": response, "step_starts": [s for s, _ in steps],
            "step_ends": [e for _, e in steps], "answer_start": answer[0], "answer_end": answer[1],
            "n_steps": len(steps)}


def make_rows(gsm_rows: list[dict]) -> list[dict]:
    """8 traces: GSM rows and variants, one with overlapping spans, one whose response outgrows max_length."""
    rows = [(row["id"], row["question"], row["answer"]) for row in gsm_rows]
    rows += [(f"{row['id']}-v", row["question"] + " Explain.", row["answer"].replace("\n", " then.\n", 1))
             for row in gsm_rows]
    long_response = "\n".join(["She sold 48/2 = <<48/2=24>>24 clips in May."] * 12) + "\n#### 24"
    table = [segment_row(i, *row) for i, row in enumerate(rows)]
    table.append(segment_row(6, "bad-spans", "Q?", "One.\n#### 1", spans=[(0, 4), (2, 11)]))
    table.append(segment_row(7, "too-long", "Q?", long_response))
    return table


def write_segments(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), path)
    return path


@pytest.fixture
def segments(tmp_path, gsm_rows) -> Path:
    return write_segments(tmp_path / "segments.parquet", make_rows(gsm_rows))


def params(tmp_path: Path, **overrides) -> Params:
    # head_variant on: these tests check the head Gram too (the default is off, for long traces)
    base = dict(device="cpu", shard_size=SHARD, max_length=120, cache_dir=str(tmp_path / "cache"), head_variant=True)
    return dataclasses.replace(Params(), **{**base, **overrides})


def output_bytes(out_dir: Path) -> dict[str, bytes]:
    files = sorted((out_dir / "shards").iterdir()) + [out_dir / "quarantine.jsonl"]
    return {str(path.relative_to(out_dir)): path.read_bytes() for path in files}


def test_params_are_the_params_yaml_section(tmp_path):
    assert defaults_are_the_section(Params, "extract", tmp_path)


def test_cli_writes_shards_quarantine_and_stats(tmp_path, segments, tiny_model_dir):
    settings = {"extract": {**dataclasses.asdict(params(tmp_path)), "device": "auto"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    out_dir = tmp_path / "extract"
    stats = main(["--params", str(tmp_path / "params.yaml"), "--segments", str(segments),
                  "--model", str(tiny_model_dir), "--out-dir", str(out_dir)])
    assert stats == json.loads((out_dir / "stats.json").read_text())
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (8, 6, 2)
    assert stats["quarantined_invalid_spans"] == stats["quarantined_response_exceeds_context"] == 1
    assert stats["shards"] == 3 and 0 <= stats["padding_waste"] < 1 and stats["tokens_per_s"] > 0
    # timings stay in stats.json: in the DVC metrics file every cross-machine `dvc metrics diff` would list them
    assert json.loads((out_dir / "metrics.json").read_text()) == {"loss_tokens": stats["loss_tokens"]}
    reasons = {q["id"]: q["reason"] for q in read_quarantine(out_dir / "quarantine.jsonl")}
    assert reasons == {"bad-spans": "invalid_spans", "too-long": "response_exceeds_context"}
    assert sorted(p.name for p in (out_dir / "shards").glob("*.parquet")) == [f"part-{i:05d}.parquet" for i in range(3)]
    table = read_extract(out_dir)
    assert table.schema.equals(EXTRACT_SCHEMA)
    assert table.column("id").to_pylist() == sorted(table.column("id").to_pylist())
    for row in table.to_pylist():
        k = row["n_steps"] + 1
        assert len(row["span_token_counts"]) == len(row["span_loss_sums"]) == k and min(row["span_token_counts"]) > 0
        proxy, head = np.array(row["proxy_gram"]).reshape(k, k), np.array(row["head_gram"]).reshape(k, k)
        np.testing.assert_allclose(proxy, proxy.T)
        assert (np.diag(proxy) > 0).all() and (np.diag(head) > 0).all()
        assert row["prompt_tokens"] + sum(row["span_token_counts"]) <= 120
    assert sum(row["prompt_tokens_truncated"] for row in table.to_pylist()) == stats["prompt_tokens_truncated"] > 0


def test_rerun_after_a_crash_finishes_the_missing_shard_with_the_same_bytes(tmp_path, segments, tiny_model_dir):
    no_cache = params(tmp_path, cache_dir=None)
    extract(segments, tiny_model_dir, tmp_path / "a", no_cache)
    extract(segments, tiny_model_dir, tmp_path / "b", no_cache)
    shards = tmp_path / "b" / "shards"
    # a crash while shard 1 was being written: its files gone, a temp file left; a shard of an older, longer plan
    (shards / "part-00001.parquet").unlink()
    (shards / "part-00001.done").unlink()
    (shards / ".part-00001.parquet.x1y2.tmp").write_bytes(b"half")
    (shards / "part-00007.parquet").write_bytes((shards / "part-00000.parquet").read_bytes())
    stats = extract(segments, tiny_model_dir, tmp_path / "b", no_cache)
    assert (stats["shards_skipped"], stats["traces_computed"]) == (2, SHARD)
    assert output_bytes(tmp_path / "b") == output_bytes(tmp_path / "a")


def test_finished_shards_are_skipped_and_tampered_ones_redone(tmp_path, segments, tiny_model_dir):
    settings = params(tmp_path, cache_dir=None)
    extract(segments, tiny_model_dir, tmp_path / "out", settings)
    model = load_model(str(tiny_model_dir), "cpu")
    calls, before = model.forward_calls, output_bytes(tmp_path / "out")
    stats = extract(segments, tiny_model_dir, tmp_path / "out", settings)
    assert model.forward_calls == calls and stats["shards_skipped"] == 3 and stats["traces_computed"] == 0
    shard = tmp_path / "out" / "shards" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])  # a torn or edited shard no longer matches its marker
    stats = extract(segments, tiny_model_dir, tmp_path / "out", settings)
    assert stats["shards_skipped"] == 2 and model.forward_calls > calls
    assert output_bytes(tmp_path / "out") == before


def test_cache_serves_a_new_output_dir_and_computes_only_new_traces(tmp_path, segments, gsm_rows, tiny_model_dir):
    settings = params(tmp_path)
    extract(segments, tiny_model_dir, tmp_path / "first", settings)
    model = load_model(str(tiny_model_dir), "cpu")
    calls = model.forward_calls
    stats = extract(segments, tiny_model_dir, tmp_path / "second", settings)  # as after DVC deleted the outs
    assert model.forward_calls == calls and (stats["traces_cached"], stats["traces_computed"]) == (8, 0)
    assert output_bytes(tmp_path / "second") == output_bytes(tmp_path / "first")
    # one new trace in front shifts every shard boundary; only it is computed
    grown = [segment_row(99, "new", "How many?", "Four and four.\n#### 8")] + make_rows(gsm_rows)
    stats = extract(write_segments(tmp_path / "grown.parquet", grown), tiny_model_dir, tmp_path / "third", settings)
    assert (stats["traces_computed"], stats["traces_cached"], stats["kept"]) == (1, 8, 7)
    assert model.forward_calls == calls + 1
    # a parameter that changes the numbers changes the key
    stats = extract(segments, tiny_model_dir, tmp_path / "fourth", params(tmp_path, head_variant=False))
    assert stats["traces_computed"] == 8
    assert read_extract(tmp_path / "fourth").column("head_gram").null_count == 6


def test_plan_keys_traces_by_content_and_finalize_needs_every_shard(tmp_path, gsm_rows, tiny_model_dir):
    rows = make_rows(gsm_rows)
    plan = plan_shards(write_segments(tmp_path / "s1.parquet", rows), params(tmp_path), tiny_model_dir)
    assert [(s.start, s.stop) for s in plan] == [(0, 3), (3, 6), (6, 8)]
    rows[7] = {**rows[7], "answer_start": rows[7]["answer_start"] + 1}  # a span of the last shard moves
    changed = plan_shards(write_segments(tmp_path / "s2.parquet", rows), params(tmp_path), tiny_model_dir)
    assert [a.fingerprint == b.fingerprint for a, b in zip(plan, changed)] == [True, True, False]
    keys = [[trace_key(spec.key_head, row) for row in rows_[6:8]] for spec, rows_ in
            ((plan[2], make_rows(gsm_rows)), (changed[2], rows))]
    assert keys[0][0] == keys[1][0] and keys[0][1] != keys[1][1]  # only the moved trace's key changes
    with pytest.raises(RuntimeError, match="part-00000"):
        finalize(tmp_path / "nothing", plan, [])


def test_duplicate_in_the_next_shard_comes_from_the_cache_whatever_the_prefetch(tmp_path, gsm_rows, tiny_model_dir):
    rows = make_rows(gsm_rows)
    rows.insert(SHARD, {**rows[0], "id": "gsm-a-again", "source_row": 8})  # first row of shard 1 = row 0's content
    segments = write_segments(tmp_path / "dup.parquet", rows)
    stats = extract(segments, tiny_model_dir, tmp_path / "one", params(tmp_path, cache_dir=str(tmp_path / "c1")))
    assert stats["traces_cached"] == 1  # shard 1 was tokenized before shard 0 finished, then looked up again
    table = read_extract(tmp_path / "one").to_pylist()
    first, again = (next(r for r in table if r["id"] == name) for name in ("gsm-a", "gsm-a-again"))
    assert {**first, "id": None} == {**again, "id": None}
    extract(segments, tiny_model_dir, tmp_path / "two", params(tmp_path, cache_dir=str(tmp_path / "c2")))
    assert output_bytes(tmp_path / "two") == output_bytes(tmp_path / "one")


def test_pack_cache_confirms_full_keys_and_takes_the_first_indexed_pack(tmp_path):
    """The index holds 8-byte prefixes only: a prefix shared by two keys must not mix them up."""
    def pack(name: str, entries: dict[str, str]) -> None:
        rows = [{"key": key, "reason": "r", "detail": detail} for key, detail in entries.items()]
        pq.write_table(pa.Table.from_pylist(rows, schema=PACK_SCHEMA), tmp_path / f"{name}.parquet")

    same_prefix = ["ab" * 8 + "0" * 48, "ab" * 8 + "f" * 48]  # equal first 16 hex digits
    other = "12" * 32
    pack("b-first", {same_prefix[0]: "first pack", other: "first pack"})
    cache = PackCache(tmp_path)
    assert {k: r["detail"] for k, r in cache.get([same_prefix[1], other]).items()} == {other: "first pack"}
    pack("a-later", {same_prefix[1]: "later pack", other: "later pack"})  # indexed second though it sorts first
    found = cache.get([*same_prefix, other, "00" * 32])
    assert {k: r["detail"] for k, r in found.items()} == {
        same_prefix[0]: "first pack", same_prefix[1]: "later pack", other: "first pack"}
    assert cache.prefixes.dtype == np.uint64 and len(cache.prefixes) == 4
    assert np.all(np.diff(cache.prefixes.astype(np.float64)) >= 0)
    assert cache.get([]) == {}


def test_a_shard_whose_rows_changed_after_planning_is_refused(tmp_path, gsm_rows, tiny_model_dir):
    rows = make_rows(gsm_rows)
    plan = plan_shards(write_segments(tmp_path / "s.parquet", rows), params(tmp_path), tiny_model_dir)
    rows[4] = {**rows[4], "scored_response": rows[4]["scored_response"] + " "}
    changed = write_segments(tmp_path / "s.parquet", rows)  # same path, new content
    extract_shard(plan[0], changed, tiny_model_dir, tmp_path / "out", params(tmp_path))  # shard 0 is untouched
    with pytest.raises(RuntimeError, match="changed since the plan"):
        extract_shard(plan[1], changed, tiny_model_dir, tmp_path / "out", params(tmp_path))


def test_progress_lines_reach_stderr_under_python_m(tmp_path, tiny_model_dir):
    """dvc.yaml runs `python -m tasks.curate.extract`: there the module is __main__, and its progress
    logger must still be one of `tasks`, whose lines the command prints (they once went nowhere)."""
    import os
    import subprocess
    import sys

    from tests.tasks import tiny_pipeline
    from tests.tasks.curate.test_extract_scale import gsm_rows

    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(2))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"extract": {"device": "cpu", "cache_dir": None}}))
    done = subprocess.run(
        [sys.executable, "-m", "tasks.curate.extract", "--params", str(tmp_path / "params.yaml"), "--segments",
         str(segments), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path / "out")],
        cwd=Path(__file__).parents[3], env={**os.environ, "GRACE_PROGRESS": "log", "GRACE_PROGRESS_SECONDS": "0", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=300, check=True)
    assert "extract: 2/2 traces (100%)" in done.stderr, done.stderr
