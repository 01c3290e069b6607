"""Stage 1, ingest: formats, field mapping, answer extraction, quarantine and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import TRACE_SCHEMA, content_hash
from tasks.core.stage import ParamsError, StageInputError, params_from_dict
from tasks.curate.ingest import Params, extract_final_answer, ingest, main
from tests.params_yaml import committed_file, defaults_are_the_section

REPO = Path(__file__).resolve().parents[3]

CHAT_ROWS = [
    {
        "id": "chat-a",
        "messages": [
            {"role": "system", "content": "Solve step by step."},
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "Let me think."},
            {"role": "user", "content": "Please show the work for 2+3."},
            {"role": "assistant", "content": "2+3 = 5.\nThe answer is 5."},
        ],
    },
    {
        "id": "chat-b",
        "messages": [
            {"role": "user", "content": "Halve 1."},
            {"role": "assistant", "content": "1/2 is a half.\nSo $\\boxed{\\frac{1}{2}}$"},
        ],
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; blank lines hold none (an empty quarantine.jsonl is one blank line)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run(tmp_path: Path, rows_or_bytes, params: Params = Params(), name: str = "in.jsonl"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / name
    if isinstance(rows_or_bytes, bytes):
        source.write_bytes(rows_or_bytes)
    else:
        write_jsonl(source, rows_or_bytes)
    stats = ingest(source, tmp_path / "out", params)
    table = pq.read_table(tmp_path / "out" / "traces.parquet")
    return stats, table, read_jsonl(tmp_path / "out" / "quarantine.jsonl")


def test_gsm_rows_become_canonical_traces(tmp_path, gsm_rows):
    stats, table, quarantine = run(tmp_path, gsm_rows)
    assert table.schema.equals(TRACE_SCHEMA)
    assert (stats["read"], stats["kept"], stats["quarantined"], quarantine) == (3, 3, 0, [])
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["gsm-a", "gsm-b", "gsm-c"]
    assert [r["source_row"] for r in rows] == [0, 1, 2]
    assert [r["final_answer"] for r in rows] == ["72", "10", "10"]
    assert {r["answer_source"] for r in rows} == {"gsm8k"}
    for row, original in zip(rows, gsm_rows):
        assert row["question"] == original["question"] and row["response"] == original["answer"]
        assert json.loads(row["prompt_messages"]) == [{"role": "user", "content": original["question"]}]
        assert row["content_hash"] == content_hash(row["prompt_messages"], row["response"])
        assert json.loads(row["raw"]) == original
    assert "€2.50" in rows[2]["raw"]  # ensure_ascii=False: the record can be written back as it came
    # the pool as the dataset cards cite it
    assert (stats["input"], stats["input_sha256"]) == ((tmp_path / "in.jsonl").as_posix(),
                                                       hashlib.sha256((tmp_path / "in.jsonl").read_bytes()).hexdigest())


@pytest.mark.parametrize("rows", [pytest.param([dict(r) for r in CHAT_ROWS], id="chat"), pytest.param(None, id="gsm")])
def test_jsonl_parquet_and_hf_disk_give_the_same_table(tmp_path, gsm_rows, rows):
    import datasets

    rows = rows or gsm_rows
    write_jsonl(tmp_path / "in.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf_dict"))
    tables = {}
    for name in ["in.jsonl", "in.parquet", "hf", "hf_dict"]:
        stats = ingest(tmp_path / name, tmp_path / f"out-{name}", Params())
        assert (stats["read"], stats["kept"]) == (len(rows), len(rows))
        tables[name] = pq.read_table(tmp_path / f"out-{name}" / "traces.parquet")
    assert tables["in.jsonl"].num_rows == len(rows)
    for name in ["in.parquet", "hf", "hf_dict"]:
        assert tables[name].equals(tables["in.jsonl"]), name


def test_a_dataset_dict_is_read_at_ingest_split(tmp_path, gsm_rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(gsm_rows[:2]),
                          "test": datasets.Dataset.from_list(gsm_rows[2:])}).save_to_disk(str(tmp_path / "hf"))
    assert ingest(tmp_path / "hf", tmp_path / "out", Params(split="test"))["kept"] == 1
    with pytest.raises(ParamsError) as refused:  # one line on the command line, naming the splits and the setting
        ingest(tmp_path / "hf", tmp_path / "out2", Params())
    assert str(refused.value) == (f"ingest.split: {tmp_path / 'hf'} holds splits ['train', 'test'] and ingest.split "
                                  "is null; set ingest.split to one of them")
    with pytest.raises(ParamsError, match="it has no split 'validation'"):
        ingest(tmp_path / "hf", tmp_path / "out3", Params(split="validation"))


def test_compressed_jsonl_and_json_read_as_the_plain_file(tmp_path, gsm_rows):
    import gzip

    lines = [json.dumps(r).encode() for r in gsm_rows] + [b'{"id": "broken"']
    plain = run(tmp_path / "plain", b"\n".join(lines) + b"\n")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "in.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    stats = ingest(tmp_path / "gz" / "in.jsonl.gz", tmp_path / "gz" / "out", Params())
    assert pq.read_table(tmp_path / "gz" / "out" / "traces.parquet").equals(plain[1])
    assert stats["quarantined_malformed_json"] == 1  # a bad line still costs one record
    (tmp_path / "gz" / "alpaca.json.gz").write_bytes(gzip.compress(json.dumps(gsm_rows).encode()))
    assert ingest(tmp_path / "gz" / "alpaca.json.gz", tmp_path / "gz" / "out2", Params())["kept"] == 3
    try:
        import zstandard
    except ImportError:  # zstandard is optional: a .zst file is then one line saying what to do
        (tmp_path / "in.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
        with pytest.raises(StageInputError, match="zstandard-compressed, and the zstandard package is not installed"):
            ingest(tmp_path / "in.jsonl.zst", tmp_path / "zst", Params())
    else:
        (tmp_path / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
        ingest(tmp_path / "in.jsonl.zst", tmp_path / "zst", Params())
        assert pq.read_table(tmp_path / "zst" / "traces.parquet").equals(plain[1])


def test_a_hub_id_is_read_by_load_dataset(tmp_path, gsm_rows, monkeypatch):
    """Offline: a local dataset directory through the same datasets.load_dataset call a hub id takes."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "owner" / "gsm"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", gsm_rows[:2])
    write_jsonl(repo / "data" / "test.jsonl", gsm_rows[2:])
    stats = ingest(repo, tmp_path / "out", Params(format="hub", split="train"))
    assert stats["kept"] == 2
    assert pq.read_table(tmp_path / "out" / "traces.parquet").column("id").to_pylist() == ["gsm-a", "gsm-b"]
    called = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: called.append(name) or datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(gsm_rows)}))
    assert ingest(Path("open-r1/OpenR1-Math-220k"), tmp_path / "out2", Params())["kept"] == 3  # auto: an id
    assert called == ["open-r1/OpenR1-Math-220k"]


def test_every_bad_record_kind_is_quarantined_with_its_reason(tmp_path, gsm_rows):
    good = [json.dumps(r, ensure_ascii=False).encode() for r in gsm_rows]
    bad = {
        "malformed_json": b'{"id": "x1", "question": "q"',
        "not_object": b'[1, 2, 3]',
        "undecodable_bytes": b'{"id": "x2", "question": "caf\xe9", "answer": "#### 1"}',
        "missing_field": json.dumps({"id": "x3", "answer": "#### 1"}).encode(),
        "empty_field": json.dumps({"id": "x4", "question": "q?", "answer": "  \n"}).encode(),
        "wrong_type": json.dumps({"id": "x5", "question": ["q"], "answer": "#### 1"}).encode(),
        "unknown_role": json.dumps({"id": "x6", "messages": [{"from": "robot", "value": "q"}]}).encode(),
        "duplicate_id": json.dumps({"id": "gsm-a", "question": "again?", "answer": "#### 2"}).encode(),
        "no_assistant_turn": json.dumps({"id": "x7", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    }
    lines = [good[0], *bad.values(), b"", b"   \r", good[1], good[2]]
    stats, table, quarantine = run(tmp_path, b"\n".join(lines) + b"\n")
    assert table.column("id").to_pylist() == ["gsm-a", "gsm-b", "gsm-c"]  # survivors of every bad line
    assert table.column("source_row").to_pylist() == [0, 12, 13]  # 0-based line numbers, blanks included
    assert [q["reason"] for q in quarantine] == list(bad)
    assert [q["source_row"] for q in quarantine] == list(range(1, 10))
    assert all(q["stage"] == "ingest" and q["detail"] and q["record"] for q in quarantine)
    assert quarantine[2]["record"].startswith('{"id": "x2"') and "\\xe9" in quarantine[2]["record"]
    assert quarantine[7]["id"] == "gsm-a"
    assert stats["read"] == 12 and stats["blank_lines"] == 2
    assert stats["read"] == stats["kept"] + stats["quarantined"] and stats["kept"] == 3
    assert all(stats[f"quarantined_{reason}"] == 1 for reason in bad)
    assert json.loads((tmp_path / "out" / "stats.json").read_text()) == stats


def test_jsonl_with_a_bom_and_crlf_line_ends(tmp_path, gsm_rows):
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in gsm_rows]
    stats, table, quarantine = run(tmp_path, b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    assert (stats["read"], stats["kept"], quarantine) == (3, 3, [])
    assert table.column("id").to_pylist() == ["gsm-a", "gsm-b", "gsm-c"]
    assert [json.loads(raw) for raw in table.column("raw").to_pylist()] == gsm_rows


def test_chat_messages_mapping(tmp_path):
    rows = [dict(r) for r in CHAT_ROWS] + [
        {"messages": [{"role": "user", "content": "1+1?", "name": "u"}, {"role": "assistant", "content": "#### 2"},
                      {"role": "user", "content": "thanks"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "#### 3"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
    ]
    stats, table, quarantine = run(tmp_path, rows)
    first, second, third = table.to_pylist()
    assert json.loads(first["prompt_messages"]) == CHAT_ROWS[0]["messages"][:4]  # the system turn stays
    assert first["question"] == "Please show the work for 2+3."
    assert first["response"] == "2+3 = 5.\nThe answer is 5."
    assert (first["final_answer"], first["answer_source"]) == ("5", "answer_is")
    assert (second["final_answer"], second["answer_source"]) == ("\\frac{1}{2}", "boxed")
    # Only role and content are canonical; turns after the last assistant turn are not prompt.
    assert json.loads(third["prompt_messages"]) == [{"role": "user", "content": "1+1?"}]
    assert third["response"] == "#### 2" and third["id"].startswith("h-")
    assert [q["reason"] for q in quarantine] == ["missing_field", "wrong_type"]
    assert stats["read"] == 5 == stats["kept"] + stats["quarantined"]


def test_id_falls_back_to_a_stable_content_hash(tmp_path, gsm_rows):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in gsm_rows]
    _, table, _ = run(tmp_path / "a", rows)
    _, again, _ = run(tmp_path / "b", rows)
    ids = table.column("id").to_pylist()
    assert ids == again.column("id").to_pylist()
    assert len(set(ids)) == 3
    for trace in table.to_pylist():
        assert trace["id"] == "h-" + content_hash(trace["prompt_messages"], trace["response"])[:16]
    # id_field null ignores given ids; the same content gets the same id, so a repeat is a duplicate.
    stats, table, quarantine = run(tmp_path / "c", gsm_rows + gsm_rows[:1], Params(id_field=None))
    assert table.column("id").to_pylist() == ids
    assert [q["reason"] for q in quarantine] == ["duplicate_id"]


def test_integer_ids_and_answer_field(tmp_path):
    rows = [
        {"id": 7, "problem": "1+1?", "solution": "1+1 = 2", "final": 2},
        {"id": 8, "problem": "2+2?", "solution": "2+2 = 4. The answer is 4.", "final": None},
        {"id": 9, "problem": "3+3?", "solution": "3+3 = 6", "final": ["6"]},
    ]
    stats, table, quarantine = run(tmp_path, rows, Params(answer_field="final"))
    assert table.column("id").to_pylist() == ["7", "8"]
    assert table.column("final_answer").to_pylist() == ["2", "4"]
    assert table.column("answer_source").to_pylist() == ["field", "answer_is"]  # a null field falls back
    assert [(q["reason"], q["id"]) for q in quarantine] == [("wrong_type", "9")]


@pytest.mark.parametrize(
    "text, patterns, expected",
    [
        ("48+24 = 72\n#### 72", ("gsm8k",), ("72", "gsm8k")),
        ("#### 1,234", ("gsm8k",), ("1234", "gsm8k")),
        ("#### $1,000.50.", ("gsm8k",), ("1000.50", "gsm8k")),
        ("#### 5 apples, 3 pears", ("gsm8k",), ("5 apples, 3 pears", "gsm8k")),
        ("The answer is: 42.", ("answer_is",), ("42", "answer_is")),
        ("so the final answer is 42", ("answer_is",), ("42", "answer_is")),
        ("The answer is 2.5. Done.", ("answer_is",), ("2.5", "answer_is")),
        ("The answer is $18", ("answer_is",), ("18", "answer_is")),
        ("The answer is **7**.", ("answer_is",), ("7", "answer_is")),
        ("The answer is $\\boxed{42}$.", ("answer_is",), ("42", "answer_is")),
        ("the answer is 3 then.\nNo, the answer is 4", ("answer_is",), ("4", "answer_is")),
        ("So $\\boxed{\\frac{1}{2}}$.", ("boxed",), ("\\frac{1}{2}", "boxed")),
        ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", ("boxed",), ("\\sqrt{\\frac{a}{b}}", "boxed")),
        ("\\boxed{\\{1, 2\\}}", ("boxed",), ("\\{1, 2\\}", "boxed")),
        ("\\boxed{3} and a cut-off \\boxed{\\frac{1", ("boxed",), ("3", "boxed")),
        # Patterns are tried in params order; the first that occurs wins, at its last occurrence.
        ("The answer is 5\n#### 6", ("gsm8k", "answer_is"), ("6", "gsm8k")),
        ("The answer is 5\n#### 6", ("answer_is", "gsm8k"), ("5", "answer_is")),
        ("\\boxed{9}\n#### 8", ("answer_is", "boxed", "gsm8k"), ("9", "boxed")),
        ("####\nno answer here", ("gsm8k", "answer_is", "boxed"), None),
        ("just text, 42", ("gsm8k", "answer_is", "boxed"), None),
    ],
)
def test_extract_final_answer(text, patterns, expected):
    assert extract_final_answer(text, patterns) == expected


def test_params_defaults_are_the_params_yaml_section(tmp_path):
    assert defaults_are_the_section(Params, "ingest", tmp_path)
    with pytest.raises(ParamsError, match="ingest.format"):
        params_from_dict(Params, "ingest", {"format": "csv"})
    with pytest.raises(ParamsError, match="ingest.answer_patterns"):
        params_from_dict(Params, "ingest", {"answer_patterns": ["gsm8k", "latex"]})


def test_cli_runs_the_stage(tmp_path, gsm_rows, capsys):
    source = write_jsonl(tmp_path / "pool.jsonl", gsm_rows)
    params = committed_file(tmp_path / "params")
    stats = main(["--input", str(source), "--out-dir", str(tmp_path / "out"), "--params", str(params)])
    assert stats["kept"] == 3
    # images/: dvc.yaml's out of ingest, there (empty) for a text pool too
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"traces.parquet", "quarantine.jsonl", "stats.json",
                                                               "images"}
    (tmp_path / "pool.txt").write_text("")
    capsys.readouterr()  # the first run's count line
    with pytest.raises(SystemExit) as stopped:  # on the command line a setting to change is one line, not a traceback
        main(["--input", str(tmp_path / "pool.txt"), "--out-dir", str(tmp_path / "x"),
              "--params", str(params)])
    assert stopped.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("python -m tasks.curate.ingest: error: ingest.format") and "pool.txt" in line


def test_the_final_answer_is_never_read_from_inside_the_reasoning_block(tmp_path):
    """Issue 22: a final solution without a marker took the answer from inside <think>; it is read after
    </think> only (segment.reasoning_tags, where segment places the answer span), or not at all."""
    rows = [{"id": "retracted", "question": "2*2?",
             "response": "<think>\nMaybe 2+2. Hmm, the answer is 5? No.\n</think>\nTwice two is 4."},
            {"id": "other-kind", "question": "2*2?", "response": "<think>\n#### 5\n</think>\nSo $\\boxed{4}$."},
            {"id": "open-tag-in-prompt", "question": "2*2?", "response": "The answer is 5?\n</think>\nIt is 4."},
            {"id": "after", "question": "2*2?", "response": "<think>\nThe answer is 5?\n</think>\nThe answer is 4."}]
    _, table, _ = run(tmp_path / "default", rows)
    answers = dict(zip(table.column("id").to_pylist(), zip(table.column("final_answer").to_pylist(),
                                                            table.column("answer_source").to_pylist())))
    assert answers == {"retracted": ("", "none"), "other-kind": ("4", "boxed"), "open-tag-in-prompt": ("", "none"),
                       "after": ("4", "answer_is")}
    # the tags come from params.yaml's segment section, through the stage's command line
    params = tmp_path / "params.yaml"
    params.write_text("ingest: {}\nsegment: {reasoning_tags: []}\n")
    source = write_jsonl(tmp_path / "pool.jsonl", rows[:1])
    main(["--input", str(source), "--out-dir", str(tmp_path / "untagged"), "--params", str(params)])
    untagged = pq.read_table(tmp_path / "untagged" / "traces.parquet")
    assert untagged.column("final_answer").to_pylist() == ["5"]  # no reasoning block: the whole response is read


# ---- the layouts people hold (params.yaml ingest.preset; README "Your own data") ------------------
def test_alpaca_input_is_part_of_the_question_and_a_json_array_is_read_as_json(tmp_path):
    rows = [{"instruction": "Solve.", "input": "What is 2+2?", "output": "2+2 = 4\n#### 4"},
            {"instruction": "What is 3+3?", "input": "", "output": "3+3 = 6\n#### 6"},
            "not a record"]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    stats = ingest(tmp_path / "alpaca.json", tmp_path / "out", Params(preset="alpaca"))
    table = pq.read_table(tmp_path / "out" / "traces.parquet")
    assert table.column("question").to_pylist() == ["Solve.\n\nWhat is 2+2?", "What is 3+3?"]
    assert [q["reason"] for q in read_jsonl(tmp_path / "out" / "quarantine.jsonl")] == ["not_object"]
    assert (stats["read"], stats["kept"], stats["preset"]) == (3, 2, "alpaca")
    # JSON Lines under a .json name stays readable; a JSON object is no record list and says what it holds
    write_jsonl(tmp_path / "lines.json", rows[:2])
    assert ingest(tmp_path / "lines.json", tmp_path / "out2", Params(preset="alpaca"))["kept"] == 2
    (tmp_path / "object.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"JSON array .* keys \['data'\]"):
        ingest(tmp_path / "object.json", tmp_path / "out3", Params(format="json"))


def test_alpaca_history_is_the_earlier_turns_before_the_question(tmp_path):
    rows = [{"id": "two-turns", "instruction": "And doubled?", "output": "4 x 2 = 8\n#### 8", "system": "Be brief.",
             "history": [["What is 2+2?", "2+2 = 4"]]},
            {"id": "bad-history", "instruction": "And doubled?", "output": "8\n#### 8", "history": [["only one"]]}]
    stats, table, quarantine = run(tmp_path, rows, Params(preset="alpaca"))
    assert json.loads(table.column("prompt_messages")[0].as_py()) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4"}, {"role": "user", "content": "And doubled?"}]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("bad-history", "wrong_type")]
    assert "[user, assistant]" in quarantine[0]["detail"] and stats["kept"] == 1


def test_sharegpt_and_llava_conversations(tmp_path):
    rows = [{"id": "s1", "conversations": [{"from": "system", "value": "Be brief."},
                                           {"from": "human", "value": "<image>\nHow many bars?"},
                                           {"from": "gpt", "value": "I count them.\nThere are 3 bars."}]},
            {"id": "s2", "conversations": [{"from": "human", "value": "hi"}]},
            {"id": "s3", "conversations": [{"speaker": "human", "text": "hi"}]}]
    stats, table, quarantine = run(tmp_path, rows, Params(preset="sharegpt"))
    (trace,) = table.to_pylist()
    assert json.loads(trace["prompt_messages"]) == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "<image>\nHow many bars?"}]
    assert (trace["response"], trace["answer_source"], trace["final_answer"]) == (
        "I count them.\nThere are 3 bars.", "none", "")
    assert [q["reason"] for q in quarantine] == ["no_assistant_turn", "wrong_type"]
    assert "conversations[0] is ['speaker', 'text']" in quarantine[1]["detail"]
    # without the preset the record is not silently dropped: the run stops, naming the field and the preset
    with pytest.raises(StageInputError) as stopped:
        run(tmp_path / "plain", rows[:1])
    assert "'conversations'" in str(stopped.value) and "ingest.preset: sharegpt" in str(stopped.value)


def test_metamath_answer_is_colon(tmp_path):
    rows = [{"query": "3 packs of 12, 10 given away?", "response": "3 x 12 = 36.\n36 - 10 = 26.\nThe answer is: 26",
             "type": "GSM_Rephrased"}]
    _, table, _ = run(tmp_path, rows, Params(preset="metamath"))
    assert table.column("question").to_pylist() == ["3 packs of 12, 10 given away?"]
    assert (table.column("final_answer")[0].as_py(), table.column("answer_source")[0].as_py()) == ("26", "answer_is")


def test_numina_generations_become_one_trace_each(tmp_path):
    rows = [{"uuid": "p1", "problem": "1+1?", "solution": "So $\\boxed{2}$.", "messages": [{"role": "user", "content": "x"}],
             "generations": ["<think>\n1+1.\n</think>\n1+1 is $\\boxed{2}$.", None, "", "Two, $\\boxed{2}$."]},
            {"uuid": "p2", "problem": "2+2?", "solution": "Add: $\\boxed{4}$."},
            {"uuid": "p3", "problem": "3+3?", "solution": "6", "generations": []}]
    stats, table, quarantine = run(tmp_path, rows, Params(preset="numina"))
    assert table.column("id").to_pylist() == ["p1-0", "p1-3", "p2"]
    assert table.column("final_answer").to_pylist() == ["2", "2", "4"]
    assert json.loads(table.column("raw")[0].as_py())["generations"] == [rows[0]["generations"][0]]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("p1-1", "null_generation"), ("p1-2", "empty_field"),
                                                           ("p3", "empty_field")]
    assert (stats["read"], stats["kept"], stats["generations_expanded"]) == (6, 3, 3)  # 4 + 1 + 1 reads


def test_numina_everything_per_generation_follows_the_selected_one(tmp_path):
    """OpenR1: a trace of generation 2 keeps generation 2 in its own `messages` and per-generation lists."""
    generations = ["A: $\\boxed{5}$.", "B: 2 + 3 = $\\boxed{5}$.", "C: 2 + 3 is $\\boxed{6}$."]
    rows = [{"uuid": "p1", "problem": "2+3?", "solution": "$\\boxed{5}$", "generations": generations,
             "messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": generations[0]}],
             "correctness_math_verify": [True, True, False], "is_reasoning_complete": [True, True, True],
             "finish_reasons": ["stop", "stop", "length"], "correctness_llama": None, "correctness_count": 2}]
    _, table, _ = run(tmp_path, rows, Params(preset="numina"))
    raw = {row["id"]: json.loads(row["raw"]) for row in table.to_pylist()}
    third = raw["p1-2"]
    assert third["generations"] == [generations[2]]
    assert third["messages"] == [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": generations[2]}]
    assert (third["correctness_math_verify"], third["is_reasoning_complete"], third["finish_reasons"]) == \
        ([False], [True], ["length"])
    assert third["correctness_llama"] is None and third["correctness_count"] == 2  # not per generation: as it was
    assert raw["p1-1"]["messages"][1]["content"] == generations[1]


def test_an_exact_repeat_of_a_response_is_quarantined_with_its_reason(tmp_path):
    same = "2 + 3 = 5.\nSo $\\boxed{5}$."
    rows = [{"uuid": "p1", "problem": "2+3?", "solution": "5", "generations": [same, same, "Five: $\\boxed{5}$."]},
            {"uuid": "p2", "problem": "2+3?", "solution": same}]  # the same question and response in another record
    stats, table, quarantine = run(tmp_path, rows, Params(preset="numina"))
    assert table.column("id").to_pylist() == ["p1-0", "p1-2"]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("p1-1", "duplicate_response"), ("p2", "duplicate_response")]
    assert "the same prompt and response as 'p1-0'" in quarantine[0]["detail"]
    assert stats["quarantined_duplicate_response"] == 2 and stats["read"] == stats["kept"] + stats["quarantined"]
    _, kept_all, _ = run(tmp_path / "keep", rows, Params(preset="numina", drop_duplicate_responses=False))
    assert kept_all.num_rows == 4


def test_question_response_answer_records_score_the_reasoning_not_the_answer(tmp_path):
    """The default response_fields list `answer` first: of several present, the longest text is the response."""
    rows = [{"id": "q1", "question": "6 x 9?", "response": "6 x 9 = 54.\nThe answer is 54.", "answer": "54"},
            {"id": "q2", "question": "2+2?", "answer": "2 + 2 = 4.\n#### 4"}]  # GSM8K: `answer` alone is the response
    _, table, _ = run(tmp_path, rows)
    assert table.column("response").to_pylist() == ["6 x 9 = 54.\nThe answer is 54.", "2 + 2 = 4.\n#### 4"]
    assert table.column("final_answer").to_pylist() == ["54", "4"]


def test_openai_text_content_parts_are_read_as_text(tmp_path):
    parts = [{"type": "text", "text": "What is 2+3?"}, {"type": "text", "text": "Show your work."}]
    rows = [{"id": "c1", "messages": [{"role": "user", "content": parts},
                                      {"role": "assistant", "content": [{"type": "text", "text": "2+3 = 5.\n#### 5"}]}]},
            {"id": "c2", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                      {"role": "assistant", "content": "5"}]}]
    _, table, quarantine = run(tmp_path, rows)
    row = table.to_pylist()[0]
    assert (row["question"], row["response"], row["final_answer"]) == ("What is 2+3?\nShow your work.", "2+3 = 5.\n#### 5", "5")
    assert [(q["id"], q["reason"]) for q in quarantine] == [("c2", "wrong_type")]
    assert "parts of type ['image_url']; only text parts are read as text" in quarantine[0]["detail"]


def test_multiple_choice_options_and_letters(tmp_path):
    rows = [{"question": "Speed of 150 km in 3 h?", "options": ["A) 40", "B) 50"], "rationale": "150/3 = 50.\nAnswer: (B)",
             "correct": "B"},
            {"question": "20% of 250?", "options": {"A": "25", "B": "50"}, "rationale": "0.2 x 250 = 50.\nSo B.",
             "correct": None},
            {"question": "Prime?", "options": ["21", "29"], "rationale": "21 = 3 x 7.\nThe correct option is B.",
             "correct": "(B)"}]
    _, table, _ = run(tmp_path, rows, Params(preset="multiple_choice"))
    assert table.column("question").to_pylist() == ["Speed of 150 km in 3 h?\nA) 40\nB) 50", "20% of 250?\nA) 25\nB) 50",
                                                    "Prime?\nA) 21\nB) 29"]
    assert table.column("final_answer").to_pylist() == ["B", "", "B"]
    assert table.column("answer_source").to_pylist() == ["field", "none", "field"]


def test_a_multiple_choice_answer_that_is_no_option_is_quarantined(tmp_path):
    rows = [{"id": "e", "question": "Speed?", "options": ["A) 40", "B) 50"], "rationale": "150/3 = 50.", "correct": "E"},
            {"id": "said-c", "question": "Half of 8?", "options": {"A": "2", "B": "4"}, "rationale": "8/2 = 4.\nAnswer: (C)"},
            {"id": "ok", "question": "Half of 8?", "options": {"A": "2", "B": "4"}, "rationale": "8/2 = 4.",
             "correct": "B"}]
    _, table, quarantine = run(tmp_path, rows, Params(preset="multiple_choice"))
    assert table.column("id").to_pylist() == ["ok"]
    assert [(q["id"], q["reason"]) for q in quarantine] == [("e", "answer_not_in_options"),
                                                           ("said-c", "answer_not_in_options")]


def test_presets_fill_only_the_keys_left_at_their_defaults():
    assert Params(preset="alpaca").resolved().question_fields == ("instruction",)
    assert Params(preset="alpaca", question_fields=("task",)).resolved().question_fields == ("task",)
    with pytest.raises(ParamsError, match="ingest.preset"):
        params_from_dict(Params, "ingest", {"preset": "dolly"})


@pytest.mark.parametrize("name, preset, kept, reasons", [
    ("messages.jsonl", "messages", 4, ["no_assistant_turn"]),
    ("sharegpt.jsonl", "sharegpt", 3, ["no_assistant_turn"]),
    ("alpaca.json", "alpaca", 3, ["empty_field"]),
    ("metamath.jsonl", "metamath", 4, []),
    ("numina.jsonl", "numina", 5, ["null_generation"]),
    ("multiple_choice.jsonl", "multiple_choice", 3, ["wrong_type"]),
    ("long_cot.jsonl", "messages", 4, []),
])
def test_bundled_layout_samples(tmp_path, name, preset, kept, reasons):
    stats = ingest(REPO / "data" / "layouts" / name, tmp_path, Params(preset=preset))
    assert stats["kept"] == kept and [q["reason"] for q in read_jsonl(tmp_path / "quarantine.jsonl")] == reasons
    assert stats["read"] == stats["kept"] + stats["quarantined"]
