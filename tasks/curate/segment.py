"""Stage 2, segment: each trace's steps and final answer as character spans of the scored response.

The answer span starts at the final-answer line: the line holding the last marker ("#### X",
"The answer is X", "\\boxed{X}", "Answer: (B)"), the whole line even where the marker sits
mid-line ("So she pays 10. The answer is 10"); for an answer taken from a field with no marker, the
line holding the field's value (its last occurrence). With neither (a model-written solution ending
in prose, "Therefore, there are 29 valid strings."), `answer_fallback` says where the answer span is:
the last sentence or the last step; `none` quarantines the trace. Which rule placed each answer span
is the `answer_span_source` column (marker | field | last_sentence | last_step), counted in stats.json.
Text after that line (a sign-off) joins the answer span. Steps are the pieces of the text before it
(params.yaml `segment.strategy`; step_marker keeps the text before the first marker as a step, and a
trace without markers as one step).

Long chain-of-thought: a response whose reasoning block ends in the closing tag of `reasoning_tags`
(the opening tag is optional, as chat templates often put it in the prompt) is a reasoning block and
a final solution. Steps of the block are its paragraphs or the pieces starting at `reasoning_markers`
("Wait,", "Alternatively,"); the tags join the first and last of them. The answer span is looked for in
the final solution only (a retracted "the answer is 3" inside the reasoning is not the answer; ingest
reads the answer's value there too, by these same tags), and
the final solution's text before it gives further steps by `strategy`. An opening tag never closed
(unclosed_reasoning) or a final solution with no text (empty_final_solution) is quarantined.

With strip_calculator the scored response is the response without <<calc>> annotations and spans
refer to it; `response` stays as ingested. Spans exclude surrounding whitespace and never overlap,
and every non-whitespace character lies in exactly one step or the answer span. Traces keep input order.

    python -m tasks.curate.segment --traces outputs/ingest/traces.parquet --out-dir outputs/segment
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.schema import SEGMENT_SCHEMA, TRACE_SCHEMA
from tasks.core.stage import (ParamsError, Stage, StageInputError, StageLedger, atomic_outputs, params_section,
                              stage_logger, write_parquet)
from tasks.curate.answers import last_marker_start, reasoning_close

STRATEGIES = ("newline", "paragraph", "step_marker", "sentence")
FALLBACKS = ("last_sentence", "last_step", "none")
REASONING_SPLITS = ("paragraph", "markers")
BATCH_ROWS = 4096

# GSM8K calculator annotations: "48/2 = <<48/2=24>>24". Requiring "=" spares code such as "a << b >> c".
CALCULATOR = re.compile(r"<<[^<>\n]*=[^<>\n]*>>")
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")
# "Step 1:", "Step 2.", "**Step 3:**", "### Step 4)" at a line start or after a sentence end.
_STEP_MARKER = re.compile(r"(?:^|(?<=[.!?:]\s))[ \t]*(?:#+[ \t]*|[-*>][ \t]+)?(?:\*\*|__)?Step[ \t]+\d+[ \t]*[:.)]",
                          re.MULTILINE)
# Regions a sentence or line split never enters: code fences, display and inline math, inline code.
# Inline "$...$" follows pandoc: no space inside either delimiter, no digit after the closing one,
# so currency ("$5. Then she paid $3.") is not taken for math.
_PROTECTED = re.compile(
    r"```.*?```|\$\$.+?\$\$|\\\[.*?\\\]|\\\(.*?\\\)|`[^`\n]+`|\$(?=\S)(?:[^$\n\\]|\\.)+?(?<=\S)\$(?!\d)", re.DOTALL
)
# A sentence end: punctuation (closing quotes/brackets allowed), spaces, then a sentence-like start.
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*[ \t]+(?=[\d\\$(\"'\[`]|[^\W\d_])")
_ABBREVIATIONS = {"e.g.", "i.e.", "cf.", "vs.", "approx.", "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "fig.",
                  "eq.", "no.", "resp.", "al."}


@params_section("segment")
class Params:
    strategy: str = "newline"  # newline | paragraph (blank-line separated) | step_marker ("Step N:") | sentence
    strip_calculator: bool = False  # drop GSM8K <<expr=value>> before scoring (changes what the model sees)
    answer_fallback: str = "last_sentence"  # no marker, no located field: last_sentence | last_step | none (quarantine)
    reasoning_tags: tuple[str, ...] = ("<think>", "</think>")  # (open, close) of a reasoning block; () = off
    reasoning_split: str = "paragraph"  # steps inside the reasoning block: paragraph | markers
    reasoning_markers: tuple[str, ...] = ("Wait,", "Alternatively,", "Hmm,", "But wait,")  # reasoning_split: markers

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ParamsError(f"segment.strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.answer_fallback not in FALLBACKS:
            raise ParamsError(f"segment.answer_fallback: {self.answer_fallback!r} is not one of {list(FALLBACKS)}")
        if len(self.reasoning_tags) not in (0, 2) or not all(isinstance(t, str) and t for t in self.reasoning_tags):
            raise ParamsError("segment.reasoning_tags: need [] or [open, close], two non-empty strings")
        if self.reasoning_split not in REASONING_SPLITS:
            raise ParamsError(f"segment.reasoning_split: {self.reasoning_split!r} is not one of {list(REASONING_SPLITS)}")
        if self.reasoning_split == "markers" and not self.reasoning_markers:
            raise ParamsError("segment.reasoning_markers: reasoning_split markers needs at least one marker")


class Unsegmentable(Exception):
    """A trace segment cannot split: `reason` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _is_sentence_end(text: str, match: re.Match) -> bool:
    """False where the punctuation ends an abbreviation, an initial or a list number, or the next word is lower-case."""
    following = text[match.end()]
    if following.isalpha() and not following.isupper():
        return False
    line_start = text.rfind("\n", 0, match.start()) + 1
    before = text[line_start:match.start() + 1].split()
    word = before[-1] if before else ""
    if word.lower() in _ABBREVIATIONS or re.fullmatch(r"\(?[A-Z]\.", word):
        return False
    return not (len(before) == 1 and re.fullmatch(r"\d+\.", word))  # "1. First ..." numbers a list item


def _cuts(text: str, strategy: str) -> list[int]:
    """Offsets where a new piece starts. Sentences refine lines: a line break always cuts, but neither
    a line break nor a sentence end cuts inside a code fence or math (display math may span lines)."""
    if strategy == "newline":
        return [m.end() for m in re.finditer("\n", text)]
    if strategy == "paragraph":
        return [m.end() for m in _BLANK_LINES.finditer(text)]
    if strategy == "step_marker":
        return [m.start() for m in _STEP_MARKER.finditer(text)]
    protected = [m.span() for m in _PROTECTED.finditer(text)]  # disjoint, in order
    protected_starts = [start for start, _ in protected]
    candidates = [m.end() for m in re.finditer("\n", text)]
    candidates += [m.end() for m in _SENTENCE_END.finditer(text) if _is_sentence_end(text, m)]

    def inside(cut: int) -> bool:
        index = bisect.bisect_left(protected_starts, cut) - 1  # the last region starting before the cut
        return index >= 0 and cut < protected[index][1]

    return sorted(cut for cut in candidates if not inside(cut))


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_steps(text: str, strategy: str) -> list[tuple[int, int]]:
    """Step spans (start, end) of `text`: its pieces between cuts, trimmed, empty ones dropped."""
    bounds = [0, *sorted(set(_cuts(text, strategy)) - {0}), len(text)]
    spans = [_trim(text, start, end) for start, end in zip(bounds, bounds[1:])]
    return [(start, end) for start, end in spans if start < end]


def _marker_cuts(text: str, markers: tuple[str, ...]) -> list[int]:
    """Offsets where a reasoning marker ("Wait,") starts a line or follows a sentence end."""
    pattern = "|".join(re.escape(marker) for marker in markers)
    return [m.start(1) for m in re.finditer(rf"(?:^|(?<=[.!?:]\s)|(?<=[.!?:]))[ \t]*({pattern})", text, re.MULTILINE)]


def _pieces(text: str, start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [start, *sorted({c for c in cuts if start < c < end}), end]
    spans = [_trim(text, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    return [(lo, hi) for lo, hi in spans if lo < hi]


def _located_field(text: str, start: int, value: str) -> int | None:
    """Offset of the last occurrence of the answer value in text[start:], not inside a longer number or word."""
    if not value:
        return None
    found = [m.start() for m in re.finditer(rf"(?<![\w.]){re.escape(value)}(?![\w]|\.\d)", text[start:])]
    return start + found[-1] if found else None


def answer_span(text: str, answer_source: str, final_answer: str = "", fallback: str = "none",
                strategy: str = "newline", start: int = 0) -> tuple[tuple[int, int], str] | None:
    """((start, end), rule) of the answer span in text[start:]: the final-answer line through the end."""
    region = text[start:]
    marker = last_marker_start(region)
    if marker is not None:
        line_start, rule = text.rfind("\n", 0, start + marker) + 1, "marker"
    elif answer_source == "field" and (located := _located_field(text, start, final_answer)) is not None:
        line_start, rule = text.rfind("\n", 0, located) + 1, "field"
    elif fallback == "none" or not region.strip():
        return None
    else:
        pieces = _pieces(text, start, len(text), [start + c for c in _cuts(region, "sentence" if fallback == "last_sentence"
                                                                           else strategy)])
        line_start, rule = pieces[-1][0], fallback
    return _trim(text, max(line_start, start), len(text)), rule


def reasoning_end(text: str, tags: tuple[str, ...]) -> int | None:
    """Offset just after the reasoning block's closing tag; None without one. Raises Unsegmentable."""
    end = reasoning_close(text, tags)  # the one definition, shared with ingest's reading of the final answer
    if end is None:
        if tags and (opened := text.find(tags[0])) >= 0:
            raise Unsegmentable("unclosed_reasoning", f"{tags[0]} at character {opened} is never closed by {tags[1]}")
        return None
    if not text[end:].strip():
        raise Unsegmentable("empty_final_solution", f"nothing after {tags[1]}: the reasoning has no final solution")
    return end


def segment_text(text: str, answer_source: str, params: Params, final_answer: str = "",
                 ) -> tuple[list[tuple[int, int]], tuple[int, int], str]:
    """(step spans, answer span, answer rule) of one scored response; raises Unsegmentable."""
    end = reasoning_end(text, params.reasoning_tags)
    start = 0 if end is None else end
    found = answer_span(text, answer_source, final_answer, params.answer_fallback, params.strategy, start)
    if found is None:
        where = "response" if end is None else "final solution"
        raise Unsegmentable("no_answer_span", f"no final-answer line in the {where} and answer_fallback is none")
    answer, rule = found
    steps = []
    if end is not None:
        open_at = text.find(params.reasoning_tags[0], 0, end)
        inner_start = open_at + len(params.reasoning_tags[0]) if open_at >= 0 else 0
        inner_end = end - len(params.reasoning_tags[1])
        cuts = ([inner_start + c for c in _cuts(text[inner_start:inner_end], "paragraph")]
                if params.reasoning_split == "paragraph" else
                [inner_start + c for c in _marker_cuts(text[inner_start:inner_end], params.reasoning_markers)])
        steps = _pieces(text, inner_start, inner_end, cuts) or [(inner_start, inner_start)]
        # the tags belong to the reasoning: its first step starts at the text's start, its last ends at the close
        steps[0] = (_trim(text, 0, end)[0], steps[0][1])
        steps[-1] = (steps[-1][0], end)
    steps += [(start + lo, start + hi) for lo, hi in split_steps(text[start:answer[0]], params.strategy)]
    return steps, answer, rule


@atomic_outputs
def segment(traces: Path, out_dir: Path, params: Params) -> dict:
    """Split each trace of traces.parquet into steps + answer: segments.parquet, quarantine.jsonl, stats.json."""
    ledger = StageLedger("segment")
    rules: Counter[str] = Counter()
    with_reasoning = 0
    columns: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    missing = set(TRACE_SCHEMA.names) - set(pq.read_schema(traces).names)
    if missing:
        raise StageInputError(f"{traces} is not an ingest trace table: missing columns {sorted(missing)}")
    for batch in pq.ParquetFile(traces).iter_batches(batch_size=BATCH_ROWS, columns=TRACE_SCHEMA.names):
        for trace in batch.to_pylist():
            ledger.count_read()
            scored = CALCULATOR.sub("", trace["response"]) if params.strip_calculator else trace["response"]
            try:
                steps, answer, rule = segment_text(scored, trace["answer_source"], params, trace["final_answer"])
                if not steps:
                    raise Unsegmentable("no_steps", "no text before the final-answer line to split into steps "
                                                    f"({params.strategy}; answer span by {rule})")
            except Unsegmentable as error:
                ledger.reject(error.reason, error.detail, id=trace["id"], source_row=trace["source_row"],
                              record=json.dumps({"id": trace["id"], "scored_response": scored}, ensure_ascii=False))
                continue
            ledger.keep()
            rules[rule] += 1
            with_reasoning += reasoning_end(scored, params.reasoning_tags) is not None
            for name in TRACE_SCHEMA.names:
                columns[name].append(trace[name])
            columns["scored_response"].append(scored)
            columns["step_starts"].append([start for start, _ in steps])
            columns["step_ends"].append([end for _, end in steps])
            columns["answer_start"].append(answer[0])
            columns["answer_end"].append(answer[1])
            columns["n_steps"].append(len(steps))
            columns["answer_span_source"].append(rule)
    ledger.require_kept(traces)
    out_dir = Path(out_dir)
    write_parquet(out_dir / "segments.parquet", pa.table(columns, schema=SEGMENT_SCHEMA))
    ledger.extra.update(strategy=params.strategy, strip_calculator=params.strip_calculator,
                        answer_fallback=params.answer_fallback, answer_span_source=dict(sorted(rules.items())),
                        reasoning_traces=with_reasoning,
                        steps_total=sum(columns["n_steps"]),
                        # Many one-step traces say the strategy does not fit the data (no markers, no blank lines).
                        single_step_traces=sum(n == 1 for n in columns["n_steps"]),
                        mean_steps=round(sum(columns["n_steps"]) / ledger.kept, 4) if ledger.kept else 0.0)
    warning = one_step_warning(ledger.extra["single_step_traces"], ledger.kept, params.strategy)
    if warning:  # in the log, and in stats.json where the report shows it above everything
        ledger.extra["warnings"] = [warning]
        stage_logger("segment").warning(warning)
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


def one_step_warning(single: int, kept: int, strategy: str) -> str | None:
    """Most traces in one step: their score is alpha alone (no step before the answer to be consistent with)."""
    if not kept or 2 * single <= kept:
        return None
    advice = ("for prose with several sentences a line, set segment.strategy: sentence" if strategy != "sentence"
              else "the responses have no sentence breaks before their answer")
    return (f"{single} of {kept} traces have one step: segment.strategy {strategy} found no step breaks in them, "
            f"so their score is alpha alone; {advice}")


STAGE = Stage(segment, Params, paths=[
    ("traces", "ingest traces.parquet"),
    ("out_dir", "output directory"),
])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
