"""Stage 2, segment: each trace's steps and final answer as character spans of the scored response.

The answer span starts at the final-answer line: the line holding the last marker ("#### X",
"The answer is X", "\\boxed{X}"), the whole line even where the marker sits mid-line ("So she pays
10. The answer is 10"); for an answer taken from a field with no marker, the last non-empty line.
Text after that line (a sign-off) joins the answer span. Steps are the pieces of the text before it
(params.yaml `segment.strategy`; step_marker keeps the text before the first marker as a step, and a
trace without markers as one step). With strip_calculator the scored response is the response
without <<calc>> annotations and spans refer to it; `response` stays as ingested. Spans exclude
surrounding whitespace and never overlap, and every non-whitespace character lies in exactly one
step or the answer span. Traces keep input order.

    python -m tasks.segment --traces outputs/ingest/traces.parquet --out-dir outputs/segment
"""

from __future__ import annotations

import bisect
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.answers import last_marker_start
from tasks.schema import SEGMENT_SCHEMA, TRACE_SCHEMA
from tasks.stage import (ParamsError, StageInputError, StageLedger, atomic_outputs, params_section, run_stage,
                         write_parquet)

STRATEGIES = ("newline", "paragraph", "step_marker", "sentence")
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

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ParamsError(f"segment.strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")


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


def answer_span(text: str, answer_source: str) -> tuple[int, int] | None:
    """The final-answer line through the end of the text, or None if there is no such line."""
    marker = last_marker_start(text)
    if marker is not None:
        line_start = text.rfind("\n", 0, marker) + 1
    elif answer_source == "field" and text.strip():
        line_start = text.rstrip().rfind("\n") + 1
    else:
        return None
    return _trim(text, line_start, len(text))


def segment_text(text: str, answer_source: str, strategy: str) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """(step spans, answer span) of one scored response."""
    answer = answer_span(text, answer_source)
    if answer is None:
        return [], None
    return split_steps(text[: answer[0]], strategy), answer


@atomic_outputs
def segment(traces: Path, out_dir: Path, params: Params) -> dict:
    """Split each trace of traces.parquet into steps + answer: segments.parquet, quarantine.jsonl, stats.json."""
    ledger = StageLedger("segment")
    columns: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    missing = set(TRACE_SCHEMA.names) - set(pq.read_schema(traces).names)
    if missing:
        raise StageInputError(f"{traces} is not an ingest trace table: missing columns {sorted(missing)}")
    for batch in pq.ParquetFile(traces).iter_batches(batch_size=BATCH_ROWS, columns=TRACE_SCHEMA.names):
        for trace in batch.to_pylist():
            ledger.count_read()
            scored = CALCULATOR.sub("", trace["response"]) if params.strip_calculator else trace["response"]
            steps, answer = segment_text(scored, trace["answer_source"], params.strategy)
            if answer is None or not steps:
                reason = "no_answer_span" if answer is None else "no_steps"
                detail = ("no final-answer line in the response" if answer is None
                          else f"no text before the final-answer line to split into steps ({params.strategy})")
                ledger.reject(reason, detail, id=trace["id"], source_row=trace["source_row"],
                              record=json.dumps({"id": trace["id"], "scored_response": scored}, ensure_ascii=False))
                continue
            ledger.keep()
            for name in TRACE_SCHEMA.names:
                columns[name].append(trace[name])
            columns["scored_response"].append(scored)
            columns["step_starts"].append([start for start, _ in steps])
            columns["step_ends"].append([end for _, end in steps])
            columns["answer_start"].append(answer[0])
            columns["answer_end"].append(answer[1])
            columns["n_steps"].append(len(steps))
    ledger.require_kept(traces)
    out_dir = Path(out_dir)
    write_parquet(out_dir / "segments.parquet", pa.table(columns, schema=SEGMENT_SCHEMA))
    ledger.extra.update(strategy=params.strategy, strip_calculator=params.strip_calculator,
                        steps_total=sum(columns["n_steps"]),
                        # Many one-step traces say the strategy does not fit the data (no markers, no blank lines).
                        single_step_traces=sum(n == 1 for n in columns["n_steps"]),
                        mean_steps=round(sum(columns["n_steps"]) / ledger.kept, 4) if ledger.kept else 0.0)
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


def main(argv: list[str] | None = None) -> dict:
    return run_stage("segment", Params, [("traces", "ingest traces.parquet"), ("out_dir", "output directory")],
                     segment, argv)


if __name__ == "__main__":
    main()
