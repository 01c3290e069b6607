"""Stage `unconditional`: the response's loss without its question, and the IFD ratio."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.core.artifacts import read_extract, read_losses
from tasks.core.schema import EXTRACT_SCHEMA
from tasks.core.schema import UNCONDITIONAL_SCHEMA
from tasks.core.stage import read_quarantine, write_parquet
from tasks.curate.aggregate import Params as AggregateParams
from tasks.curate.aggregate import aggregate
from tasks.curate.baselines import MissingArtifactError, baseline_scores
from tasks.curate.score import Params as ScoreParams
from tasks.curate.unconditional import main
from tests.tasks.extract_tables import extract_row, write_extract
from tests.tasks.tiny_pipeline import build_extract, build_segments


def losses_table(mean_losses: dict[str, float]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "n_tokens": 4, "loss_sum": 4 * m, "mean_loss": m}
                                 for i, m in mean_losses.items()], schema=UNCONDITIONAL_SCHEMA)


def test_ifd_on_hand_made_losses():
    # conditional mean losses: a 6/3 = 2.0, b 3/3 = 1.0, c 1.8/3 = 0.6 (span sums over 3 spans of 1 token)
    table = pa.Table.from_pylist([extract_row(i, np.eye(3), token_counts=[1, 1, 1], loss_sums=[s / 3] * 3)
                                  for i, s in (("a", 6.0), ("b", 3.0), ("c", 1.8))], schema=EXTRACT_SCHEMA)
    unconditional = losses_table({"c": 0.3, "a": 4.0, "b": 0.5})  # any order: matched by id
    got = baseline_scores("ifd", table, seed=0, gradient="proxy", unconditional=unconditional)
    np.testing.assert_allclose(got, [0.5, 2.0, 2.0])
    with pytest.raises(MissingArtifactError, match=r"no unconditional loss for traces \['b'\]"):
        baseline_scores("ifd", table, seed=0, gradient="proxy", unconditional=losses_table({"a": 1.0, "c": 1.0}))


def test_aggregate_ranks_highest_ifd_first(tmp_path):
    rows = [extract_row(i, np.eye(2), token_counts=[2, 2], loss_sums=[1.0, 1.0]) for i in ("a", "b", "c")]
    extract_dir = write_extract(tmp_path / "extract", rows)  # conditional mean loss 0.5 for all three
    write_parquet(tmp_path / "losses.parquet", losses_table({"a": 1.0, "b": 0.25, "c": 0.5}))
    stats = aggregate(tmp_path / "unused.parquet", extract_dir, tmp_path / "out", AggregateParams(),
                      ScoreParams(method="ifd"), unconditional=tmp_path / "losses.parquet")
    samples = pq.read_table(tmp_path / "out" / "sample_scores.parquet")
    assert samples["id"].to_pylist() == ["b", "c", "a"] and stats["method"] == "ifd"
    np.testing.assert_allclose(samples["score"].to_numpy(), [2.0, 1.0, 0.5])


def hand_unconditional_loss(model_dir, response: str) -> tuple[float, int]:
    """Sum of response-token NLL under the chat template with the assistant turn alone, by plain CE."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "assistant", "content": response}], tokenize=False)
    start = text.rfind(response)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([encoding["input_ids"]])  # (1, T)
    in_response = torch.tensor([start <= s < start + len(response) and e > s for s, e in encoding["offset_mapping"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V)
    targets = in_response[1:]  # position t is scored when token t+1 is a response token
    loss = F.cross_entropy(logits[targets], ids[0, 1:][targets], reduction="sum")
    return float(loss), int(targets.sum())


def test_losses_without_the_question(tmp_path, tiny_model_dir, gsm_rows):
    segments = build_segments(tmp_path, gsm_rows)
    params = tmp_path / "params.yaml"  # the stage reads extract's section: same template, same max_length
    params.write_text("extract:\n  device: cpu\n  cache_dir: null\n", encoding="utf-8")
    stats = main(["--params", str(params), "--segments", str(segments), "--model", str(tiny_model_dir),
                  "--out-dir", str(tmp_path / "unconditional")])
    assert stats["read"] == stats["kept"] == len(gsm_rows)
    metrics = json.loads((tmp_path / "unconditional" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics == {"mean_loss": stats["mean_loss"]} and stats["seconds"] >= 0  # the timing is in stats.json only
    table = read_losses(tmp_path / "unconditional" / "losses.parquet")
    assert table.schema == UNCONDITIONAL_SCHEMA
    responses = dict(zip(*pq.read_table(segments, columns=["id", "scored_response"]).to_pydict().values()))
    conditional = read_extract(build_extract(tmp_path, segments, tiny_model_dir)).to_pylist()
    for row, cond in zip(table.to_pylist(), conditional):
        assert row["id"] == cond["id"]
        loss, n_tokens = hand_unconditional_loss(tiny_model_dir, responses[row["id"]])
        assert row["n_tokens"] == n_tokens == sum(cond["span_token_counts"])  # the same response tokens
        np.testing.assert_allclose(row["loss_sum"], loss, rtol=1e-5)
        np.testing.assert_allclose(row["mean_loss"], loss / n_tokens, rtol=1e-5)
        assert abs(row["loss_sum"] - sum(cond["span_loss_sums"])) > 1e-3  # the question does change the loss


def test_streamed_in_chunks_with_a_too_long_response_quarantined(tmp_path, tiny_model_dir, gsm_rows):
    """shard_size rows at a time give the losses of one pass over all rows; a response the context
    cannot hold is quarantined with its reason, and read = kept + quarantined."""
    from tasks.curate.spans import encode_traces, trace_spans
    from tasks.curate.unconditional import NO_PROMPT

    segments = build_segments(tmp_path, gsm_rows)
    rows = pq.read_table(segments).to_pylist()
    encoded = encode_traces(AutoTokenizer.from_pretrained(tiny_model_dir), [
        (NO_PROMPT, r["scored_response"], trace_spans(r["step_starts"], r["step_ends"], r["answer_start"],
                                                      r["answer_end"])) for r in rows], chat_template=True,
        max_length=4096)
    fed = {row["id"]: len(e.input_ids) for row, e in zip(rows, encoded)}
    too_long = max(fed, key=fed.get)
    fits = max(n for i, n in fed.items() if i != too_long)  # the others fit whole: their numbers must not move
    assert int(encoded[[r["id"] for r in rows].index(too_long)].span_token_counts.sum()) > fits

    def run(name: str, settings: str) -> tuple[dict, dict]:
        params = tmp_path / f"{name}.yaml"
        params.write_text("extract:\n  device: cpu\n  cache_dir: null\n" + settings, encoding="utf-8")
        stats = main(["--params", str(params), "--segments", str(segments), "--model", str(tiny_model_dir),
                      "--out-dir", str(tmp_path / name)])
        return stats, {row["id"]: row for row in read_losses(tmp_path / name / "losses.parquet").to_pylist()}

    _, whole = run("whole", "")
    stats, chunked = run("chunked", f"  shard_size: 2\n  max_length: {fits}\n")
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (3, 2, 1)
    assert stats["quarantined_response_exceeds_context"] == 1
    quarantined = read_quarantine(tmp_path / "chunked" / "quarantine.jsonl")
    assert [q["id"] for q in quarantined] == [too_long]
    assert sorted(chunked) == sorted(i for i in whole if i != too_long)
    for i, row in chunked.items():
        assert row["n_tokens"] == whole[i]["n_tokens"]
        np.testing.assert_allclose(row["loss_sum"], whole[i]["loss_sum"], rtol=1e-6)
