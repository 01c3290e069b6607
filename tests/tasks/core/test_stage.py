"""What every stage shares (tasks/core/stage.py): typed params sections, known sections, outputs that appear whole,
and the ledger's counts (one log line per stage, stats.json for bookkeeping, metrics.json for comparing)."""

from __future__ import annotations

import ast
import errno
import importlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml

import tasks.core.stage
from tasks.core.stage import ParamsError, StageInputError, StageLedger, known_sections, load_params, params_from_dict
from tasks.curate import extract, ingest, score, segment, select
from tasks.curate.ingest import main as ingest_main
from tests.params_yaml import committed_document, defaults_are_the_section
from tests.tasks import tiny_pipeline
from tests.tasks.curate.test_extract_scale import gsm_rows

REPO = Path(__file__).resolve().parents[3]
STAGE_MODULES = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "tasks").rglob("*.py")
                       if any(isinstance(n, ast.ClassDef) and n.name == "Params" for n in ast.parse(p.read_text()).body))


# ---- params: type, then range; the setting and the expected type named ------------------------------
@pytest.mark.parametrize("module, values, message", [
    (extract, {"batch_tokens": "big"}, "extract.batch_tokens = 'big': expected an integer"),
    (score, {"lambda_": "0.7"}, "score.lambda_ = '0.7': expected a number"),
    (select, {"fractions": 0.1}, "select.fractions = 0.1: expected a list (each item a number)"),
    (select, {"fractions": [0.1, "x"]}, "select.fractions[1] = 'x': expected a list (each item a number)"),
    (extract, {"cache_dir": 5}, "extract.cache_dir = 5: expected a string or null"),
    (segment, {"strip_calculator": "false"}, "segment.strip_calculator = 'false': expected true or false"),
    (extract, {"head_variant": "no"}, "extract.head_variant = 'no': expected true or false"),
    (extract, {"shard_size": 2.5}, "extract.shard_size = 2.5: expected an integer"),
    (extract, {"shard_size": True}, "extract.shard_size = True: expected an integer"),
    (ingest, {"question_fields": "question"}, "ingest.question_fields = 'question': expected a list (each item a string)"),
    (ingest, {"id_field": 5}, "ingest.id_field = 5: expected a string or null"),
    (score, {"ema_beta": float("nan")}, "score.ema_beta = nan: expected a finite number"),
    (extract, {"workers": 1.5}, "extract.workers = 1.5: expected an integer or a string"),
    (extract, {"batch_tokens": 0}, "extract.batch_tokens must be a positive integer"),  # range after type
    (extract, {"batch_size": 8}, "unknown key(s) ['batch_size']"),
    (extract, ["cpu"], "[extract]: expected a mapping of settings"),
])
def test_a_wrong_setting_is_refused_naming_it_and_its_type(module, values, message):
    with pytest.raises(ParamsError) as refused:
        params_from_dict(module.Params, module.Params.section, values)
    assert message in str(refused.value)


def test_yaml_lists_become_tuples_and_integers_numbers():
    params = params_from_dict(select.Params, "select", {"fractions": [1, 0.5], "token_budget": 100})
    assert params.fractions == (1.0, 0.5) and all(isinstance(f, float) for f in params.fractions)
    assert params_from_dict(score.Params, "score", {"lambda_": 1}).lambda_ == 1.0
    assert params_from_dict(extract.Params, "extract", {"workers": "gpus"}).workers == "gpus"


def test_every_section_is_declared_by_its_stage_module(tmp_path):
    """params.yaml holds exactly the sections the stage modules declare, each Params a strict pydantic class."""
    document = committed_document()
    working = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))  # a new section not committed yet
    assert known_sections() in (set(document), set(working))
    assert len(STAGE_MODULES) >= 15  # the modules that declare a params section
    for name in STAGE_MODULES:
        params_cls = importlib.import_module(name).Params
        assert params_cls.section in known_sections(), name
        assert params_cls.__pydantic_config__["strict"] and params_cls.__pydantic_config__["extra"] == "forbid", name
        assert defaults_are_the_section(params_cls, params_cls.section, tmp_path), name
    # the data section is declared beside ingest's (DataParams), not by a stage of its own
    assert defaults_are_the_section(ingest.DataParams, "data", tmp_path)


def test_a_misspelt_section_is_refused(tmp_path):
    document = committed_document()
    document["segmnet"] = document.pop("segment")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(ParamsError, match=r"unknown section\(s\) \['segmnet'\]"):
        load_params(ingest.Params, "ingest", tmp_path / "params.yaml")  # any stage refuses the file


def test_a_wrong_type_on_the_command_line_is_one_line(tmp_path, capsys):
    document = committed_document()
    document["ingest"]["id_field"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    (tmp_path / "pool.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        ingest.main(["--input", str(tmp_path / "pool.jsonl"), "--out-dir", str(tmp_path / "out"),
                     "--params", str(tmp_path / "params.yaml")])
    assert capsys.readouterr().err.splitlines() == [
        "python -m tasks.curate.ingest: error: params.yaml [ingest]: ingest.id_field = 5: expected a string or null"]


# ---- outputs appear together or not at all ---------------------------------------------------------
def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def disk_full_after(n_writes: int, monkeypatch) -> None:
    """Every atomic text write after the first n_writes fails as a full disk does."""
    real, calls = tasks.core.stage.atomic_write_bytes, []

    def write(path, data):
        calls.append(path)
        if len(calls) > n_writes:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(tasks.core.stage, "atomic_write_bytes", write)


def test_a_stage_that_dies_midway_leaves_its_earlier_outputs_whole(tmp_path, gsm_rows, monkeypatch):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in gsm_rows[:2]), encoding="utf-8")
    out = tmp_path / "ingest"
    assert ingest.ingest(pool, out, ingest.Params())["kept"] == 2
    before = tree(out)

    pool.write_text("".join(json.dumps(row) + "\n" for row in gsm_rows), encoding="utf-8")  # a third trace
    disk_full_after(0, monkeypatch)  # traces.parquet is written, then quarantine.jsonl hits a full disk
    with pytest.raises(OSError, match="No space left"):
        ingest.ingest(pool, out, ingest.Params())
    assert tree(out) == before  # not the new traces.parquet next to the old stats.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest", "pool.jsonl"]  # no staging left behind

    with pytest.raises(OSError):  # a first run that dies leaves no directory at all
        ingest.ingest(pool, tmp_path / "fresh", ingest.Params())
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    assert ingest.ingest(pool, out, ingest.Params())["kept"] == 3  # and the next run replaces it whole


def test_extract_dying_midway_leaves_no_earlier_stats(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(4))
    params = extract.Params(device="cpu", shard_size=2, cache_dir=None)
    out = tmp_path / "extract"
    extract.extract(segments, tiny_model_dir, out, params)
    (out / "shards" / "part-00000.done").unlink()  # a rerun must write a shard again ...
    disk_full_after(0, monkeypatch)  # ... and its quarantine write hits a full disk
    with pytest.raises(OSError):
        extract.extract(segments, tiny_model_dir, out, params)
    assert not (out / "stats.json").exists()  # the earlier run's stats do not vouch for these shards
    with pytest.raises(StageInputError, match="extract did not finish"):
        score.score(out, tmp_path / "score", score.Params())


# ---- issue 22: one writer per output, and what killed runs leave behind is cleaned -----------------------------
HOLD_LOCK = """
import os, signal, sys, time
from tasks.core.stage import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 while holding it
    time.sleep(60)
"""


def hold_lock(out: Path, then: str) -> "subprocess.Popen":
    """Another process holding out's lock (then "sleep": until killed; "die": it kill -9s itself at once)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), then], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_stops_with_one_line_naming_the_holder(tmp_path, gsm_rows, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in gsm_rows[:2]), encoding="utf-8")
    holder = hold_lock(tmp_path / "out", "sleep")
    try:
        with pytest.raises(tasks.core.stage.OutputLocked, match=rf"out is being written by pid {holder.pid} on "):
            ingest.ingest(pool, tmp_path / "out", ingest.Params())
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*.tmp"))  # nothing written
        # extract (not atomic: it writes in place) refuses before it reads anything
        with pytest.raises(tasks.core.stage.OutputLocked, match=f"pid {holder.pid}"):
            extract.extract(tmp_path / "no-segments.parquet", tmp_path / "no-model", tmp_path / "out", extract.Params())
        with pytest.raises(SystemExit) as stopped:  # on the command line: one line, exit 2
            ingest_main(["--params", str(REPO / "params.yaml"), "--input", str(pool), "--out-dir", str(tmp_path / "out")])
        assert stopped.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and f"is being written by pid {holder.pid}" in error
    finally:
        holder.kill()
        holder.wait()
    assert ingest.ingest(pool, tmp_path / "out", ingest.Params())["kept"] == 2  # free once the holder is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pool.jsonl"]  # the lock file went with it


def test_a_writer_killed_with_its_lock_leaves_none_held(tmp_path, gsm_rows):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in gsm_rows[:2]), encoding="utf-8")
    holder = hold_lock(tmp_path / "out", "die")
    holder.wait()
    assert (tmp_path / ".out.lock").exists()  # the file stays after kill -9; the kernel dropped its lock
    assert ingest.ingest(pool, tmp_path / "out", ingest.Params())["kept"] == 2
    assert not (tmp_path / ".out.lock").exists()


def test_stale_staging_of_killed_runs_is_removed_by_the_next_run(tmp_path, gsm_rows):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in gsm_rows[:2]), encoding="utf-8")
    stale = tmp_path / ".ingest.k1ll3d_9.tmp" / "ingest"  # what atomic_outputs leaves after kill -9
    stale.mkdir(parents=True)
    (stale / "traces.parquet").write_bytes(b"a whole previous output")
    (tmp_path / ".ingest.0ld0ld00.tmp").write_text("")
    others = [tmp_path / ".ingest2.abcdefgh.tmp", tmp_path / ".ingest.notmine.tmp", tmp_path / "ingest.abcdefgh.tmp"]
    for other in others:  # another output's staging, and names tempfile does not give: left alone
        other.mkdir()
    ingest.ingest(pool, tmp_path / "ingest", ingest.Params())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ingest", "pool.jsonl", *(o.name for o in others)])


def test_extract_and_validate_remove_their_killed_runs_temp_files(tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    segments = tiny_pipeline.build_segments(tmp_path / "data", gsm_rows(4))
    out = tmp_path / "extract"
    (out / "shards").mkdir(parents=True)
    leftovers = [out / ".stats.json.a1b2c3d4.tmp", out / ".quarantine.jsonl.zzzzzzzz.tmp",
                 out / "shards" / ".part-00000.parquet.q1w2e3r4.tmp"]
    for leftover in leftovers:
        leftover.write_text("half")
    extract.extract(segments, tiny_model_dir, out, extract.Params(device="cpu", shard_size=2, cache_dir=None))
    assert not any(leftover.exists() for leftover in leftovers)
    from tasks.curate import validate

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / ".results.json.a1b2c3d4.tmp").write_text("half")
    report = validate.validate(tmp_path / "no-outputs", tmp_path / "v", validate.Params(fail_on_error=False))
    assert report["success"] is False and "no-outputs" in report["error"]  # nothing to read: a failed result
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["metrics.json", "results.json"]


# ---- the ledger's counts ---------------------------------------------------------------------------

def test_a_stage_logs_read_kept_and_quarantined_by_reason_in_one_line(tmp_path, gsm_rows, tasks_log):
    missing_question = [{"id": f"m{i}", "answer": "#### 1"} for i in range(3)]
    empty_answer = [{"id": "n0", "question": "q?", "answer": "  "}]  # a marker-less answer is kept (answer_fallback)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in gsm_rows[:2] + missing_question + empty_answer))
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {}\n")
    ingest_main(["--params", str(params), "--input", str(pool), "--out-dir", str(tmp_path / "out")])
    lines = [r.getMessage() for r in tasks_log if r.name == "tasks.ingest"]
    assert len(lines) == 1 and re.fullmatch(
        r"ingest: read 6, kept 2, quarantined 4 \(empty_field 1, missing_field 3\) in \d+\.\d s", lines[0]), lines
    assert "metrics.json" not in {p.name for p in (tmp_path / "out").iterdir()}  # ingest compares nothing


def test_ledger_without_quarantine_logs_and_splits_metrics_from_stats(tmp_path, tasks_log):
    ledger = StageLedger("score")
    ledger.count_read(5)
    ledger.keep(5)
    ledger.extra.update(gradient="proxy", mean_alpha=0.25)
    ledger.metrics["mean_alpha"] = 0.25
    stats = ledger.write_stats(tmp_path / "stats.json")
    [line] = [r.getMessage() for r in tasks_log]
    assert re.fullmatch(r"score: read 5, kept 5, quarantined 0 in \d+\.\d s", line), line
    assert json.loads((tmp_path / "stats.json").read_text()) == stats and stats["gradient"] == "proxy"
    assert isinstance(stats["seconds"], float) and stats["seconds"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"mean_alpha": 0.25}


# ---- one declaration per stage: STAGE, read by the command line, the flow and dvc.yaml -------------
def stage_modules() -> dict[str, object]:
    """Every module of tasks/ that declares a STAGE, by dotted name."""
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in sorted((REPO / "tasks").rglob("*.py"))
             if "\nSTAGE = Stage(" in p.read_text(encoding="utf-8")]
    return {name: importlib.import_module(name) for name in names}


def test_every_dvc_stage_passes_exactly_the_paths_its_module_declares():
    """dvc.yaml's --flags are the STAGE's paths (the optional ones may be left out); the module's
    main is STAGE.main, so the command line has nothing of its own."""
    modules, checked = stage_modules(), 0
    assert len(modules) >= 20
    for pipeline in ("dvc.yaml", "finetune/dvc.yaml", "diagnostics/dvc.yaml"):
        for name, entry in yaml.safe_load((REPO / pipeline).read_text(encoding="utf-8"))["stages"].items():
            argv = entry["cmd"].split("#")[0].split()
            stage = modules[argv[2]].STAGE
            flags = {arg[2:].replace("-", "_") for arg in argv[3:] if arg.startswith("--")} - {"params"}
            required = {path for path, _ in stage.paths}
            assert required <= flags <= set(stage.path_names), (pipeline, name, sorted(flags ^ required))
            checked += 1
    assert checked >= 20


def test_the_command_line_names_its_own_module(capsys):
    """unconditional reads the extract section, but its --help is its own (it said tasks.extract)."""
    from tasks.curate import unconditional

    with pytest.raises(SystemExit):
        unconditional.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m tasks.curate.unconditional ")
    assert unconditional.STAGE.section == "extract"


def test_python_dash_m_names_the_module_too():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tasks.curate.score", "--help"], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.startswith("usage: python -m tasks.curate.score ")


def test_run_passes_paths_params_and_extra_sections(tmp_path):
    seen = {}

    def core(extract, out_dir, params, score, unconditional=None):
        seen.update(extract=extract, out_dir=out_dir, params=params, score=score, unconditional=unconditional)
        return "done"

    declared = tasks.core.stage.Stage(core, select.Params, paths=[("extract", "e"), ("out_dir", "o")],
                                      optional_paths=[("unconditional", "u")], extra_sections=[("score", score.Params)])
    params = tmp_path / "params.yaml"
    params.write_text("select: {fractions: [0.5]}\nscore: {lambda_: 0.25}\n")
    assert declared.run(params, extract="x", out_dir=tmp_path / "o") == "done"
    assert seen == {"extract": Path("x"), "out_dir": tmp_path / "o", "params": select.Params(fractions=(0.5,)),
                    "score": score.Params(lambda_=0.25), "unconditional": None}
    with pytest.raises(TypeError, match="no path"):
        declared.run(params, extract="x", out_dir="o", clusters="c")
    declared.main(["--params", str(params), "--extract", "x", "--out-dir", "o"])  # --unconditional may be left out
    assert seen["unconditional"] is None
    declared.main(["--params", str(params), "--extract", "x", "--out-dir", "o", "--unconditional", "u.parquet"])
    assert seen["unconditional"] == Path("u.parquet")


def test_a_ledger_counts_seconds_from_the_start_of_stage_run(tmp_path):
    """extract makes its ledger in finalize, after the model work: its seconds still cover the stage."""
    def core(out_dir, params):
        time.sleep(0.2)
        ledger = StageLedger("late")
        ledger.count_read(1)
        ledger.keep(1)
        return ledger.write_stats(out_dir / "stats.json")

    params = tmp_path / "params.yaml"
    params.write_text("select: {}\n")
    stats = tasks.core.stage.Stage(core, select.Params, paths=[("out_dir", "o")]).run(params, out_dir=tmp_path)
    assert stats["seconds"] >= 0.2


def test_a_stage_faster_than_a_tenth_of_a_second_reports_its_time_not_zero(tmp_path):
    """segment and select on a small pool take tens of milliseconds: stats.json said 0.0 seconds (issue 22)."""
    def core(out_dir, params):
        time.sleep(0.02)
        ledger = StageLedger("fast")
        return ledger.write_stats(out_dir / "stats.json")

    params = tmp_path / "params.yaml"
    params.write_text("select: {}\n")
    stats = tasks.core.stage.Stage(core, select.Params, paths=[("out_dir", "o")]).run(params, out_dir=tmp_path)
    assert 0.02 <= stats["seconds"] < 1
