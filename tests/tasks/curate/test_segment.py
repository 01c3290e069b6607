"""Stage 2, segment: step and answer spans for every strategy, coverage, quarantine and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.schema import SEGMENT_SCHEMA, TRACE_SCHEMA, content_hash
from tasks.core.stage import ParamsError, params_from_dict, read_quarantine
from tasks.curate.ingest import Params as IngestParams
from tasks.curate.ingest import ingest
from tasks.curate.segment import STRATEGIES, Params, Unsegmentable, main, segment, segment_text, split_steps
from tests.params_yaml import committed_file, defaults_are_the_section



def texts(text: str, spans: list[tuple[int, int]]) -> list[str]:
    return [text[start:end] for start, end in spans]


def ingested(tmp_path: Path, rows: list[dict]) -> Path:
    source = tmp_path / "pool.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ingest(source, tmp_path / "ingest", IngestParams())
    return tmp_path / "ingest" / "traces.parquet"


def trace_table(path: Path, items: list[tuple[str, str, str]]) -> Path:
    """A traces.parquet of (id, response, answer_source) rows, for cases ingest itself would refuse."""
    rows = []
    for row, (trace_id, response, source) in enumerate(items):
        prompt = json.dumps([{"role": "user", "content": "q"}])
        rows.append({"id": trace_id, "source_row": row, "content_hash": content_hash(prompt, response),
                     "question": "q", "prompt_messages": prompt, "response": response, "final_answer": "1",
                     "answer_source": source, "raw": "{}"})
    pq.write_table(pa.Table.from_pylist(rows, schema=TRACE_SCHEMA), path)
    return path


def assert_partition(text: str, steps: list[tuple[int, int]], answer: tuple[int, int]) -> None:
    """Spans are trimmed, ordered, disjoint, steps precede the answer, and cover every non-space char."""
    spans = [*steps, answer]
    for start, end in spans:
        assert start < end and not text[start].isspace() and not text[end - 1].isspace()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    owners = [0] * len(text)
    for start, end in spans:
        for index in range(start, end):
            owners[index] += 1
    assert all(owners[i] == 1 for i, char in enumerate(text) if not char.isspace())


def test_gsm_rows_newline_segments(tmp_path, gsm_rows):
    stats = segment(ingested(tmp_path, gsm_rows), tmp_path / "seg", Params())
    table = pq.read_table(tmp_path / "seg" / "segments.parquet")
    assert table.schema.equals(SEGMENT_SCHEMA)
    assert (stats["read"], stats["kept"], stats["quarantined"]) == (3, 3, 0)
    assert table.column("id").to_pylist() == ["gsm-a", "gsm-b", "gsm-c"]  # input order
    rows = table.to_pylist()
    first = rows[0]
    assert first["scored_response"] == first["response"]
    assert texts(first["scored_response"], list(zip(first["step_starts"], first["step_ends"]))) == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.",
    ]
    assert first["scored_response"][first["answer_start"]:first["answer_end"]] == "#### 72"
    assert [r["n_steps"] for r in rows] == [2, 2, 3]
    assert stats["steps_total"] == 7 and stats["mean_steps"] == pytest.approx(7 / 3, abs=1e-4)
    assert stats["single_step_traces"] == 0
    assert segment(tmp_path / "ingest" / "traces.parquet", tmp_path / "para", Params(strategy="paragraph"))[
        "single_step_traces"] == 3
    assert "warnings" not in stats


def test_most_traces_in_one_step_is_a_warning_naming_the_strategy(tmp_path, caplog):
    """Prose with several sentences a line: newline finds one step each, so every score is alpha alone."""
    rows = [{"id": f"p{i}", "question": f"{i} + {i}?",
             "response": f"We add {i} and {i}. That makes {2 * i}. Check it twice. So there are {2 * i} apples."}
            for i in range(4)]
    traces = ingested(tmp_path, rows)
    with caplog.at_level("WARNING", logger="tasks.segment"):
        stats = segment(traces, tmp_path / "seg", Params())
    [warning] = stats["warnings"]
    assert warning == ("4 of 4 traces have one step: segment.strategy newline found no step breaks in them, so their "
                       "score is alpha alone; for prose with several sentences a line, set segment.strategy: sentence")
    assert warning in caplog.text
    assert "warnings" not in segment(traces, tmp_path / "sent", Params(strategy="sentence"))


def test_strip_calculator_spans_refer_to_the_stripped_text(tmp_path, gsm_rows):
    segment(ingested(tmp_path, gsm_rows), tmp_path / "seg", Params(strip_calculator=True))
    rows = pq.read_table(tmp_path / "seg" / "segments.parquet").to_pylist()
    weng, cafe = rows[1], rows[2]
    assert weng["response"] == gsm_rows[1]["answer"]  # the original stays
    assert texts(weng["scored_response"], list(zip(weng["step_starts"], weng["step_ends"]))) == [
        "Weng earns 12/60 = $0.2 per minute.",
        "Working 50 minutes, she earned 0.2 x 50 = $10.",
    ]
    assert texts(cafe["scored_response"], list(zip(cafe["step_starts"], cafe["step_ends"]))) == [
        "Each croissant costs €2.50.",
        "Four cost 4 × 2.50 = €10.",
        "So she pays $\\frac{20}{2}$ = 10 euros.",
    ]
    assert cafe["scored_response"][cafe["answer_start"]:cafe["answer_end"]] == "#### 10"
    assert "<<" not in "".join(r["scored_response"] for r in rows)


CODE = "Write it in Python:\n    def f(x):\n        return x ** 2  # square\n\n    print(f(3))\nIt prints 9.\n#### 9"


@pytest.mark.parametrize(
    "strategy, text, steps, answer",
    [
        ("newline", CODE, ["Write it in Python:", "def f(x):", "return x ** 2  # square", "print(f(3))",
                           "It prints 9."], "#### 9"),
        ("newline", "Δx ≈ 0.1 → 東京 🙂\r\n\u00a0\n  y = $\\frac{1}{2}$  \nThe answer is ½",
         ["Δx ≈ 0.1 → 東京 🙂", "y = $\\frac{1}{2}$"], "The answer is ½"),
        ("paragraph", "First idea.\nStill first.\n \t\nSecond: café.\n\n\n\\[ x^2 \\]\n\\boxed{4}",
         ["First idea.\nStill first.", "Second: café.", "\\[ x^2 \\]"], "\\boxed{4}"),
        ("paragraph", CODE, ["Write it in Python:\n    def f(x):\n        return x ** 2  # square",
                             "print(f(3))\nIt prints 9."], "#### 9"),
        ("step_marker", "We plan.\nStep 1: add 2.\nmore of step one\nStep 2. multiply €3.\n**Step 3:** done. "
                        "Step 4) check $a.b$\nThe answer is 6.",
         ["We plan.", "Step 1: add 2.\nmore of step one", "Step 2. multiply €3.", "**Step 3:** done.",
          "Step 4) check $a.b$"], "The answer is 6."),
        ("step_marker", "Step 1: add. Step 2: multiply. see step 3: no\n#### 1",
         ["Step 1: add.", "Step 2: multiply. see step 3: no"], "#### 1"),
        ("step_marker", "No markers at all.\nJust text.\n#### 1", ["No markers at all.\nJust text."], "#### 1"),
        ("sentence", "It costs 2.50 each, e.g. for Léa. Then $x = 1. Y$ holds! Why? Dr. Who knows.\n"
                     "1. First item. 2 more.\nShe paid $5. Then $3. 東京 is far.\n#### 8",
         ["It costs 2.50 each, e.g. for Léa.", "Then $x = 1. Y$ holds!", "Why?", "Dr. Who knows.",
          "1. First item.", "2 more.", "She paid $5.", "Then $3. 東京 is far."], "#### 8"),
        ("sentence", "See $$a. B\n. C$$ then. ```\nx = 1. Y\n``` Ok.\n\\boxed{2}",
         ["See $$a. B\n. C$$ then.", "```\nx = 1. Y\n``` Ok."], "\\boxed{2}"),
    ],
)
def test_strategies(strategy, text, steps, answer):
    step_spans, answer_span, rule = segment_text(text, "gsm8k", Params(strategy=strategy))
    assert rule == "marker"
    assert texts(text, step_spans) == steps
    assert text[answer_span[0]:answer_span[1]] == answer
    assert_partition(text, step_spans, answer_span)


def test_answer_line_choices():
    text = "She buys 2.\nSo she pays 10. The answer is 10"
    steps, answer, rule = segment_text(text, "answer_is", Params(strategy="sentence"))
    assert text[answer[0]:answer[1]] == "So she pays 10. The answer is 10"  # the whole final-answer line
    assert texts(text, steps) == ["She buys 2."] and rule == "marker"
    # Field answers without a marker: the line holding the value's last occurrence (not inside 14).
    text = "Add them.\n2 + 2 = 4 for sure.\nNot 14, I checked.\n\n"
    steps, answer, rule = segment_text(text, "field", Params(), final_answer="4")
    assert (texts(text, steps), text[answer[0]:answer[1]], rule) == (
        ["Add them."], "2 + 2 = 4 for sure.\nNot 14, I checked.", "field")
    # The LAST marker of any kind; a nested \boxed stays whole; a sign-off joins the answer span.
    text = "The answer is 3?\nNo.\nSo $\\boxed{\\frac{1}{2}}$ it is.\nHope this helps!"
    steps, answer, _ = segment_text(text, "answer_is", Params())
    assert texts(text, steps) == ["The answer is 3?", "No."]
    assert text[answer[0]:answer[1]] == "So $\\boxed{\\frac{1}{2}}$ it is.\nHope this helps!"
    with pytest.raises(Unsegmentable, match="answer_fallback is none"):
        segment_text("no marker\nhere", "gsm8k", Params(answer_fallback="none"))


PROSE = ("We count strings with no two adjacent 1s. Let a_n be the count.\nThen a_n = a_{n-1} + a_{n-2}.\n"
         "So a_6 = 21. Therefore, there are 21 valid strings of length 6.")


@pytest.mark.parametrize("fallback, strategy, steps, answer", [
    ("last_sentence", "newline", ["We count strings with no two adjacent 1s. Let a_n be the count.",
                                  "Then a_n = a_{n-1} + a_{n-2}.", "So a_6 = 21."],
     "Therefore, there are 21 valid strings of length 6."),
    ("last_step", "newline", ["We count strings with no two adjacent 1s. Let a_n be the count.",
                              "Then a_n = a_{n-1} + a_{n-2}."],
     "So a_6 = 21. Therefore, there are 21 valid strings of length 6."),
])
def test_answer_fallback_for_prose_endings(fallback, strategy, steps, answer):
    step_spans, answer_span, rule = segment_text(PROSE, "none", Params(answer_fallback=fallback, strategy=strategy))
    assert (texts(PROSE, step_spans), PROSE[answer_span[0]:answer_span[1]], rule) == (steps, answer, fallback)
    assert_partition(PROSE, step_spans, answer_span)


LONG_COT = ("<think>\nFirst, 2+2. That is 4.\n\nWait, the question asks for 2*2. Also 4.\n\n"
            "Alternatively, square 2: 4. Hmm, the answer is 5? No.\n</think>\n\nBoth give 4.\nThe answer is $\\boxed{4}$.")


@pytest.mark.parametrize("split, markers, reasoning", [
    ("paragraph", (), ["<think>\nFirst, 2+2. That is 4.", "Wait, the question asks for 2*2. Also 4.",
                       "Alternatively, square 2: 4. Hmm, the answer is 5? No.\n</think>"]),
    ("markers", ("Wait,", "Hmm,"), ["<think>\nFirst, 2+2. That is 4.",
                                     "Wait, the question asks for 2*2. Also 4.\n\nAlternatively, square 2: 4.",
                                     "Hmm, the answer is 5? No.\n</think>"]),
])
def test_reasoning_block_steps_and_the_answer_from_the_final_solution(split, markers, reasoning):
    params = Params(reasoning_split=split, **({"reasoning_markers": markers} if markers else {}))
    steps, answer, rule = segment_text(LONG_COT, "boxed", params)
    # the "answer is 5" inside the reasoning is not the answer: the final solution's marker is
    assert texts(LONG_COT, steps) == reasoning + ["Both give 4."]
    assert (LONG_COT[answer[0]:answer[1]], rule) == ("The answer is $\\boxed{4}$.", "marker")
    assert_partition(LONG_COT, steps, answer)
    # the opening tag may sit in the prompt (chat templates); a final solution without a marker falls back
    text = "Hmm.\n\nWait, ok.</think>Add them: 4. So four it is."
    steps, answer, rule = segment_text(text, "none", params)
    assert (texts(text, steps), text[answer[0]:answer[1]], rule) == (
        ["Hmm.", "Wait, ok.</think>", "Add them: 4."], "So four it is.", "last_sentence")


def test_bad_reasoning_blocks_are_quarantined_with_reasons(tmp_path):
    traces = trace_table(tmp_path / "traces.parquet", [
        ("ok", LONG_COT, "boxed"),
        ("unclosed", "<think>\nI keep thinking. The answer is 4.", "answer_is"),
        ("no-final", "<think>\nSo 4.\n</think>\n  \n", "none"),
        ("prose", PROSE, "none"),
    ])
    stats = segment(traces, tmp_path / "seg", Params())
    quarantine = read_quarantine(tmp_path / "seg" / "quarantine.jsonl")
    assert [(q["id"], q["reason"]) for q in quarantine] == [("unclosed", "unclosed_reasoning"),
                                                           ("no-final", "empty_final_solution")]
    table = pq.read_table(tmp_path / "seg" / "segments.parquet")
    assert table.column("answer_span_source").to_pylist() == ["marker", "last_sentence"]
    assert stats["answer_span_source"] == {"last_sentence": 1, "marker": 1} and stats["reasoning_traces"] == 1
    assert stats["read"] == 4 == stats["kept"] + stats["quarantined"]


def test_quarantine_reasons_and_counts(tmp_path):
    traces = trace_table(tmp_path / "traces.parquet", [
        ("ok", "a\n#### 1", "gsm8k"),
        ("only-answer", "  #### 1\n", "gsm8k"),
        ("no-marker", "a\nb", "gsm8k"),
        ("field", "a\nb 1", "field"),
        ("field-one-line", "b 1", "field"),
    ])
    stats = segment(traces, tmp_path / "seg", Params(answer_fallback="none"))
    quarantine = read_quarantine(tmp_path / "seg" / "quarantine.jsonl")
    assert [(q["id"], q["reason"], q["source_row"]) for q in quarantine] == [
        ("only-answer", "no_steps", 1), ("no-marker", "no_answer_span", 2), ("field-one-line", "no_steps", 4)]
    assert pq.read_table(tmp_path / "seg" / "segments.parquet").column("id").to_pylist() == ["ok", "field"]
    assert stats["read"] == 5 == stats["kept"] + stats["quarantined"]
    assert (stats["quarantined_no_steps"], stats["quarantined_no_answer_span"]) == (2, 1)


FRAGMENTS = ["Step 1: add 2.", "x = 2.50 e.g. here.", "$a. B$", "  ", "\n", "\n\n", " \t\n", "東京 🙂.", "Then",
             "<<3*4=12>>12", "**Step 2.**", "```\ncode. X\n```", "$$\nA. B\n$$", "She paid $5.", "Dr. No",
             "\u00a0", "The answer is 7.", "\\boxed{\\frac{1}{2}}", "#### 5", "1. Item", "Why? ", "ok!", "<think>",
             "</think>", "Wait, no.", "Alternatively,"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("strip_calculator", [False, True])
def test_every_non_space_character_is_in_exactly_one_span(tmp_path, strategy, strip_calculator):
    rng = random.Random(f"{strategy}-{strip_calculator}")
    items = [(f"t{i}", "".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "\n"]) for _ in range(rng.randint(1, 14)))
              + rng.choice(["\n#### 5", " The answer is 5.", "\n\\boxed{5}\n", "", "\nthanks"]),
              rng.choice(["gsm8k", "field"])) for i in range(300)]
    stats = segment(trace_table(tmp_path / "traces.parquet", items), tmp_path / "seg",
                    Params(strategy=strategy, strip_calculator=strip_calculator))
    rows = pq.read_table(tmp_path / "seg" / "segments.parquet").to_pylist()
    assert len(rows) > 100 and stats["read"] == 300 == stats["kept"] + stats["quarantined"]
    for row in rows:
        text = row["scored_response"]
        assert row["n_steps"] == len(row["step_starts"]) == len(row["step_ends"]) > 0
        steps = list(zip(row["step_starts"], row["step_ends"]))
        assert_partition(text, steps, (row["answer_start"], row["answer_end"]))
        assert ("<<" in text) == ("<<" in row["response"] and not strip_calculator)


def test_split_steps_on_empty_or_blank_text():
    assert split_steps("", "newline") == [] and split_steps(" \n\t ", "sentence") == []


def test_params_defaults_are_the_params_yaml_section(tmp_path):
    assert defaults_are_the_section(Params, "segment", tmp_path)
    with pytest.raises(ParamsError, match="segment.strategy"):
        params_from_dict(Params, "segment", {"strategy": "words"})


def test_cli_runs_the_stage(tmp_path, gsm_rows):
    traces = ingested(tmp_path, gsm_rows)
    stats = main(["--traces", str(traces), "--out-dir", str(tmp_path / "seg"), "--params", str(committed_file(tmp_path / "params"))])
    assert stats["kept"] == 3 and stats["strategy"] == "newline"
    assert {p.name for p in (tmp_path / "seg").iterdir()} == {"segments.parquet", "quarantine.jsonl", "stats.json"}
