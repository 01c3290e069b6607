"""Stage export: every subset as chat messages, Alpaca, ShareGPT and Parquet, each round-tripping to the source rows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.schema import EXPORT_SCHEMA, content_hash
from tasks.core.stage import ParamsError, params_from_dict, read_quarantine
from tasks.curate import ingest
from tasks.curate.export import Params, export, to_alpaca
from tests.tasks.outputs_tree import MODEL_INFO, build_outputs


@pytest.fixture
def outputs(tmp_path):
    built = build_outputs(tmp_path / "outputs", n=30, fractions=(0.1, 0.2))
    segments = pq.read_table(tmp_path / "outputs/segment/segments.parquet").to_pylist()
    ranking = pq.read_table(tmp_path / "outputs/select/subsets/ranking.parquet").to_pylist()
    return tmp_path / "outputs", built, {r["id"]: r for r in segments}, {r["id"]: r for r in ranking}


def make_multi_turn(root, traces: dict, ids: list[str]) -> None:
    """Give the first trace of `ids` one earlier exchange and the second two, in segments.parquet and `traces`
    (content hash recomputed): multi-turn chats as ingest keeps them, system turns where there were."""
    table = pq.read_table(root / "segment/segments.parquet")
    rows = table.to_pylist()
    for row in rows:
        if row["id"] in ids[:2]:
            prompt = json.loads(row["prompt_messages"])
            earlier = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
            earlier *= 1 + ids.index(row["id"])
            system = prompt[:1] if prompt[0]["role"] == "system" else []
            row["prompt_messages"] = json.dumps(system + earlier + prompt[len(system):], ensure_ascii=False)
            row["content_hash"] = content_hash(row["prompt_messages"], row["response"])
            traces[row["id"]] = row
    pq.write_table(table.from_pylist(rows, schema=table.schema), root / "segment/segments.parquet")


def run(root, params=Params()):
    return export(root / "select/subsets", root / "segment/segments.parquet", root / "export", params, outputs=root)


def test_every_format_round_trips_to_the_source_rows(outputs):
    root, built, traces, ranking = outputs
    stats = run(root)
    for name, ids in built["subsets"].items():
        folder = root / "export/subsets" / name
        messages = [json.loads(line) for line in (folder / "messages.jsonl").read_text().splitlines()]
        assert [m["id"] for m in messages] == ids  # subset order = rank order
        for record in messages:
            trace = traces[record["id"]]
            assert record["messages"][:-1] == json.loads(trace["prompt_messages"])
            assert record["messages"][-1] == {"role": "assistant", "content": trace["response"]}
        pairs = [json.loads(line) for line in (folder / "prompt_completion.jsonl").read_text().splitlines()]
        assert [p["id"] for p in pairs] == ids
        for pair, record in zip(pairs, messages):  # the same conversation, cut where the loss starts
            assert pair["prompt"] == record["messages"][:-1] and pair["completion"] == record["messages"][-1:]
        alpaca = json.loads((folder / "alpaca.json").read_text())
        assert len(alpaca) == len(ids)
        for record, id_ in zip(alpaca, ids):
            prompt = json.loads(traces[id_]["prompt_messages"])
            system = {"system": prompt[0]["content"]} if prompt[0]["role"] == "system" else {}
            assert record == {"id": id_, "instruction": traces[id_]["question"], "input": "",
                              "output": traces[id_]["response"], **system, "score": ranking[id_]["score"],
                              "rank": ranking[id_]["rank"]}
        sharegpt = [json.loads(line) for line in (folder / "sharegpt.jsonl").read_text().splitlines()]
        speaker = {"system": "system", "user": "human", "assistant": "gpt"}
        for record, chat in zip(sharegpt, messages):
            assert record == {"id": chat["id"], "score": ranking[chat["id"]]["score"],
                              "rank": ranking[chat["id"]]["rank"],
                              "conversations": [{"from": speaker[m["role"]], "value": m["content"]}
                                                for m in chat["messages"]]}
        table = pq.read_table(folder / "data.parquet")
        assert table.schema.equals(EXPORT_SCHEMA)
        for row, id_ in zip(table.to_pylist(), ids):
            assert row["id"] == id_ and row["response"] == traces[id_]["response"]
            assert row["prompt_messages"] == json.loads(traces[id_]["prompt_messages"])
            assert (row["score"], row["rank"]) == (ranking[id_]["score"], ranking[id_]["rank"])
    n_rows = sum(len(ids) for ids in built["subsets"].values()) * 5
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (n_rows, n_rows, 0)
    assert any(traces[i]["prompt_messages"].startswith('[{"role": "system"') for i in built["subsets"]["top20pct"])


@pytest.mark.parametrize("multi_turn", [False, True], ids=["single_turn", "multi_turn"])
@pytest.mark.parametrize("file_name, preset", [("messages.jsonl", "messages"),
                                               ("prompt_completion.jsonl", "prompt_completion"),
                                               ("alpaca.json", "alpaca"), ("sharegpt.jsonl", "sharegpt"),
                                               ("data.parquet", "grace_parquet")])
def test_every_export_reads_back_through_ingest_to_the_same_ids_and_content_hashes(outputs, file_name, preset,
                                                                                   multi_turn):
    """A subset exported, then ingested with its preset, is the same traces (system prompts and, in multi-turn
    chats, the earlier turns included: Alpaca's `history`)."""
    root, built, traces, _ = outputs
    ids = built["subsets"]["top20pct"]
    if multi_turn:
        make_multi_turn(root, traces, ids)
    run(root)
    assert any(traces[i]["prompt_messages"].startswith('[{"role": "system"') for i in ids)
    stats = ingest.ingest(root / "export/subsets/top20pct" / file_name, root / "back", ingest.Params(preset=preset))
    assert (stats["kept"], stats["quarantined"]) == (len(ids), 0)
    back = pq.read_table(root / "back/traces.parquet").to_pylist()
    assert [(r["id"], r["content_hash"]) for r in back] == [(i, traces[i]["content_hash"]) for i in ids]
    assert [r["final_answer"] for r in back] == [traces[i]["final_answer"] for i in ids]


def test_multi_turn_goes_to_alpaca_history_and_a_prompt_without_alpaca_form_is_quarantined(outputs):
    root, built, traces, _ = outputs
    ids = built["subsets"]["top10pct"]
    make_multi_turn(root, traces, ids[1:])
    run(root)
    folder = root / "export/subsets/top10pct"
    alpaca = {r["id"]: r for r in json.loads((folder / "alpaca.json").read_text())}
    assert alpaca[ids[1]]["history"] == [["What is 2 + 2?", "2 + 2 = 4."]]
    assert alpaca[ids[2]]["history"] == [["What is 2 + 2?", "2 + 2 = 4."]] * 2
    assert "history" not in alpaca[ids[0]]
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["top10pct_alpaca"]["columns"]["history"] == "history"

    # two user turns in a row have no (system?) (user, assistant)* user form
    multi = ids[0]
    table = pq.read_table(root / "segment/segments.parquet")
    rows = table.to_pylist()
    for row in rows:
        if row["id"] == multi:
            turns = [{"role": "user", "content": "hi"}, {"role": "user", "content": row["question"]}]
            row["prompt_messages"] = json.dumps(turns)
    pq.write_table(table.from_pylist(rows, schema=table.schema), root / "segment/segments.parquet")
    stats = run(root)
    alpaca = json.loads((folder / "alpaca.json").read_text())
    assert len(alpaca) == len(built["subsets"]["top10pct"]) - 1
    assert multi not in [r["id"] for r in alpaca]
    first = json.loads((folder / "messages.jsonl").read_text().splitlines()[0])
    assert first["id"] == multi and [m["role"] for m in first["messages"]] == ["user", "user", "assistant"]
    quarantine = read_quarantine(root / "export/quarantine.jsonl")
    # The trace is in both subsets (top10 is inside top20): one alpaca row refused per subset.
    assert sorted((q["id"], q["reason"]) for q in quarantine) == [(multi, "alpaca_multi_turn")] * 2
    assert stats["read"] == stats["kept"] + stats["quarantined"] and stats["quarantined"] == 2


def test_missing_trace_is_quarantined_and_formats_param_is_honoured(outputs):
    root, built, _, _ = outputs
    ids_file = root / "select/subsets/top10pct/ids.txt"
    ids_file.write_text(ids_file.read_text() + "ghost\n")
    stats = run(root, Params(formats=("messages",)))
    assert sorted(p.name for p in (root / "export/subsets/top10pct").iterdir()) == [
        "README.md", "dataset_info.json", "messages.jsonl"]
    quarantine = read_quarantine(root / "export/quarantine.jsonl")
    assert [(q["id"], q["reason"]) for q in quarantine] == [("ghost", "id_not_in_segments")]
    assert stats["rows"]["top10pct"] == {"messages": len(built["subsets"]["top10pct"])}


def test_each_subset_has_a_dataset_card_and_a_llama_factory_registry(outputs):
    root, built, _, _ = outputs
    (root / "ingest/stats.json").write_text(json.dumps({"stage": "ingest", "read": 31, "kept": 30, "quarantined": 1,
                                                        "input": "data/pool.jsonl", "input_sha256": "ab" * 32}))
    run(root)
    folder = root / "export/subsets/top10pct"
    card = (folder / "README.md").read_text(encoding="utf-8")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["configs"][0] == {"config_name": "messages", "data_files": "messages.jsonl", "default": True}
    assert [(c["config_name"], c["data_files"]) for c in meta["configs"]] == [
        ("messages", "messages.jsonl"), ("prompt_completion", "prompt_completion.jsonl"), ("alpaca", "alpaca.json"),
        ("sharegpt", "sharegpt.jsonl"), ("parquet", "data.parquet")]
    assert body.startswith("\n# GRACE-curate subset top10pct\n\n3 reasoning traces from `data/pool.jsonl`, the top 10% "
                           "of traces of the 30 scored (score method grace, scoring model `tiny test model`), best first.")
    grace = meta["grace"]
    assert grace["source"] == {"file": "data/pool.jsonl", "sha256": "ab" * 32, "preset": None, "read": 31,
                                    "kept": 30, "quarantined": 1}
    assert grace["model"] == {"source": MODEL_INFO["source"], "identity": MODEL_INFO["identity"]}
    manifest = json.loads((root / "select/manifest.json").read_text())["subsets"]["top10pct"]
    assert grace["selection"] == {"rule": "the top 10% of traces", "method": "grace", "n_scored": 30,
                                  "n_selected": 3, "n_tokens": manifest["n_tokens"],
                                  "score_threshold": manifest["score_threshold"]}
    assert grace["settings"]["score.lambda_"] == "0.5" and grace["rows"]["alpaca"] == len(built["subsets"]["top10pct"])
    assert "it does not check that a step or the answer is correct" in body
    info = json.loads((folder / "dataset_info.json").read_text())
    assert info["top10pct_alpaca"] == {"file_name": "alpaca.json", "formatting": "alpaca", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system"}}
    assert info["top10pct_messages"]["file_name"] == "messages.jsonl"
    assert info["top10pct_messages"]["formatting"] == "sharegpt" and info["top10pct_messages"]["tags"]["role_tag"] == "role"
    first = json.loads((folder / "messages.jsonl").read_text().splitlines()[0])  # the tags name what the rows hold
    assert set(first["messages"][0]) == {info["top10pct_messages"]["tags"]["role_tag"], "content"}
    # ShareGPT under LLaMA-Factory's default tags (from/value, human/gpt/system): no tags to declare
    assert info["top10pct_sharegpt"] == {"file_name": "sharegpt.jsonl", "formatting": "sharegpt",
                                         "columns": {"messages": "conversations"}}
    assert "history" not in info["top10pct_alpaca"]["columns"]  # no row has earlier turns


def test_rerun_replaces_stale_subsets(outputs):
    root, _, _, _ = outputs
    run(root)
    (root / "export/subsets/old_subset").mkdir()
    run(root)
    assert sorted(p.name for p in (root / "export/subsets").iterdir()) == ["top10pct", "top20pct"]


def test_params_and_alpaca_shapes():
    with pytest.raises(ParamsError, match="export.formats"):
        params_from_dict(Params, "export", {"formats": ["messages", "llava"]})
    assert params_from_dict(Params, "export", {"formats": ["alpaca"]}).formats == ("alpaca",)
    assert to_alpaca([{"role": "user", "content": "q"}], "q", "r") == {"instruction": "q", "input": "", "output": "r"}
    # the system prompt is Alpaca's `system` column, never the problem's `input`
    assert to_alpaca([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "q", "r") == {
        "instruction": "q", "input": "", "output": "r", "system": "s"}
    assert to_alpaca([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "q", "r") is None
    # earlier exchanges are `history` pairs, oldest first; two user turns in a row have no Alpaca form
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q"}]
    assert to_alpaca(turns, "q", "r") == {"instruction": "q", "input": "", "output": "r", "system": "s",
                                          "history": [["u1", "a1"]]}
    assert to_alpaca([{"role": "user", "content": "u"}, {"role": "user", "content": "q"}], "q", "r") is None
