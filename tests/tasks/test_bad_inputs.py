"""Bad and empty inputs: one bad record costs one record, and a stage with nothing to keep stops at once.

On the command line (as `dvc repro` runs a stage) every such stop is one line naming the stage and
the path, with exit status 2, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.core.artifacts import read_extract
from tasks.core.schema import SAMPLE_SCORE_SCHEMA, SEGMENT_SCHEMA, STEP_SCORE_SCHEMA
from tasks.core.stage import StageInputError, read_quarantine, write_parquet
from tasks.curate import aggregate, export, extract, ingest, report, score, segment, select, unconditional, validate
from tests.params_yaml import committed_file
from tests.tasks.extract_tables import write_extract



def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def cli_error(capsys, main, *argv) -> str:
    """Run a stage's command line that must stop: its exit status is 2 and stderr is one line."""
    capsys.readouterr()  # what earlier calls logged (a stage's count line) is not this command's
    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in argv])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def quarantine(out_dir: Path) -> list[dict]:
    return read_quarantine(out_dir / "quarantine.jsonl")


def test_a_lone_surrogate_escape_costs_its_record_only(tmp_path, gsm_rows):
    good = [json.dumps(row) for row in gsm_rows]  # ensure_ascii: a real pair of escapes is not a lone one
    emoji = json.dumps({**gsm_rows[0], "id": "emoji", "question": gsm_rows[0]["question"] + " \U0001F642"})
    escaped_backslash = json.dumps({**gsm_rows[0], "id": "backslash", "question": "a \\ud800 b?"})
    lone = '{"id": "lone", "question": "Why \\ud800?", "answer": "Because.\\n#### 1"}'
    source = write_lines(tmp_path / "pool.jsonl", [good[0], lone, good[1], emoji, escaped_backslash, good[2]])
    stats = ingest.ingest(source, tmp_path / "out", ingest.Params())
    assert (stats["read"], stats["kept"], stats["quarantined_unpaired_surrogate"]) == (6, 5, 1)
    [bad] = quarantine(tmp_path / "out")
    assert bad["source_row"] == 1 and "surrogate" in bad["detail"] and bad["record"] == lone


@pytest.mark.parametrize("bad_id", ["a\nb", "a\r\nb", "tail\n", "a\u2028b", "a\x0cb"])
def test_an_id_with_a_line_break_is_refused_at_ingest(tmp_path, gsm_rows, bad_id):
    rows = gsm_rows + [{**gsm_rows[0], "id": bad_id}]
    source = write_lines(tmp_path / "pool.jsonl", [json.dumps(row) for row in rows])
    stats = ingest.ingest(source, tmp_path / "out", ingest.Params())
    assert (stats["kept"], stats["quarantined_id_line_break"]) == (3, 1)
    assert quarantine(tmp_path / "out")[0]["source_row"] == 3


def test_a_wrong_field_mapping_stops_ingest_naming_the_fields(tmp_path, gsm_rows, capsys):
    rows = [{"uid": r["id"], "query": r["question"], "solution_text": r["answer"]} for r in gsm_rows]
    source = write_lines(tmp_path / "pool.jsonl", [json.dumps(row) for row in rows])
    line = cli_error(capsys, ingest.main, "--input", source, "--out-dir", tmp_path / "out", "--params",
                     committed_file(tmp_path / "params"))
    assert line.startswith("python -m tasks.curate.ingest: error: ingest: kept none of the 3 records of")
    assert "missing_field: 3" in line and "ingest.question_fields ['question'," in line
    assert "the records have fields ['query', 'solution_text', 'uid']" in line
    assert not (tmp_path / "out").exists()  # nothing half-done for the next stage to read


def test_unreadable_inputs_are_one_line_naming_the_path(tmp_path, capsys):
    def ingest_error(path: Path) -> str:
        return cli_error(capsys, ingest.main, "--input", path, "--out-dir", tmp_path / "out", "--params",
                         committed_file(tmp_path / "params"))

    assert "no-such.jsonl does not exist" in ingest_error(tmp_path / "no-such.jsonl")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not a dataset")
    assert f"{tmp_path / 'folder'}: a directory, but not a dataset" in ingest_error(tmp_path / "folder")
    (tmp_path / "fake.parquet").write_text('{"id": 1}\n')
    assert f"{tmp_path / 'fake.parquet'}: not a Parquet file" in ingest_error(tmp_path / "fake.parquet")


def test_every_stage_stops_on_empty_input_with_one_line(tmp_path, tiny_model_dir, capsys):
    params = committed_file(tmp_path / "params")
    empty = write_lines(tmp_path / "empty.jsonl", [])
    assert cli_error(capsys, ingest.main, "--input", empty, "--out-dir", tmp_path / "i", "--params", params) \
        .endswith(f"ingest: {empty} holds no records")

    # segment: every trace quarantined (no text before the answer line to split into steps)
    stepless = write_lines(tmp_path / "stepless.jsonl", [json.dumps({"id": "x", "question": "2+3?", "answer": "#### 5"})])
    ingest.ingest(stepless, tmp_path / "ingest", ingest.Params())
    line = cli_error(capsys, segment.main, "--traces", tmp_path / "ingest" / "traces.parquet", "--out-dir",
                     tmp_path / "s", "--params", params)
    assert "segment: kept none of the 1 records" in line and "no_steps: 1" in line

    segments = tmp_path / "segments.parquet"
    write_parquet(segments, SEGMENT_SCHEMA.empty_table())
    model_params = tmp_path / "params.yaml"
    document = yaml.safe_load(params.read_text(encoding="utf-8"))
    document["extract"].update(device="cpu", cache_dir=None)
    model_params.write_text(yaml.safe_dump(document), encoding="utf-8")
    for main in (extract.main, unconditional.main):
        line = cli_error(capsys, main, "--segments", segments, "--model", tiny_model_dir, "--out-dir", tmp_path / "e",
                         "--params", model_params)
        assert f"{segments} holds no" in line, line

    no_traces = write_extract(tmp_path / "extract", [])  # a finished extract run that kept nothing
    assert "score: " in cli_error(capsys, score.main, "--extract", no_traces, "--out-dir", tmp_path / "sc",
                                  "--params", params)
    steps = tmp_path / "step_scores.parquet"
    write_parquet(steps, STEP_SCORE_SCHEMA.empty_table())
    assert "aggregate: " in cli_error(capsys, aggregate.main, "--step-scores", steps, "--extract", no_traces,
                                      "--unconditional", tmp_path / "none.parquet", "--out-dir", tmp_path / "a",
                                      "--params", params)
    samples = tmp_path / "sample_scores.parquet"
    write_parquet(samples, SAMPLE_SCORE_SCHEMA.empty_table())
    assert "holds no scored traces" in cli_error(capsys, select.main, "--sample-scores", samples, "--segments",
                                                 segments, "--clusters", tmp_path / "clusters.parquet", "--out-dir",
                                                 tmp_path / "sel", "--params", params)
    (tmp_path / "subsets").mkdir()
    assert "no <subset>/ids.txt" in cli_error(capsys, export.main, "--subsets", tmp_path / "subsets", "--segments",
                                              segments, "--out-dir", tmp_path / "x", "--params", params)
    (tmp_path / "outputs").mkdir()
    for main in (validate.main, report.main):
        assert str(tmp_path / "outputs") in cli_error(capsys, main, "--outputs", tmp_path / "outputs", "--out-dir",
                                                      tmp_path / "outputs" / "v", "--params", params)
    for out in ("i", "s", "e", "sc", "a", "sel", "x"):
        assert not (tmp_path / out).exists(), out


def test_extract_refuses_an_unfinished_output(tmp_path):
    partial = write_extract(tmp_path / "extract", [])
    (partial / "stats.json").unlink()  # as a run killed before finalize leaves it
    with pytest.raises(StageInputError, match="extract did not finish"):
        read_extract(partial)
