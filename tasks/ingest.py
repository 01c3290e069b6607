"""Stage 1, ingest: JSONL, Parquet or a saved Hugging Face dataset -> one canonical trace table.

Records are mapped by params.yaml `ingest` (plain question/response fields, or chat `messages`),
the final answer is taken from a field or extracted from the response (tasks/answers.py), and
each record becomes one TRACE_SCHEMA row. A record that cannot become a trace is quarantined with
a reason; stats.json shows read = kept + quarantined. Input is streamed (JSONL line by line,
Parquet and Arrow in batches); kept rows are held as column lists and written once.

    python -m tasks.ingest --input data/gsm_noisy/pool.jsonl --out-dir outputs/ingest
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.answers import ANSWER_PATTERNS, extract_final_answer, normalise_answer
from tasks.readers import read_records
from tasks.schema import TRACE_SCHEMA, content_hash
from tasks.stage import ParamsError, StageLedger, atomic_outputs, params_section, run_stage, write_parquet

__all__ = ["Params", "extract_final_answer", "ingest", "main"]

FORMATS = ("auto", "jsonl", "parquet", "hf_disk")


@params_section("ingest")
class Params:
    format: str = "auto"  # auto (by suffix; a directory = HF dataset on disk) | jsonl | parquet | hf_disk
    id_field: str | None = "id"  # null or missing: id = "h-" + 16 hex of the content hash
    question_fields: tuple[str, ...] = ("question", "prompt", "instruction", "problem")  # first present wins
    response_fields: tuple[str, ...] = ("answer", "response", "solution", "output", "completion")
    answer_field: str | None = None  # null = extract from the response; a missing value falls back to that
    messages_field: str | None = "messages"  # chat records: prompt = turns before the last assistant turn
    answer_patterns: tuple[str, ...] = ("gsm8k", "answer_is", "boxed")  # tried in this order

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ParamsError(f"ingest.format: {self.format!r} is not one of {list(FORMATS)}")
        unknown = [p for p in self.answer_patterns if p not in ANSWER_PATTERNS]
        if unknown or not self.answer_patterns:
            raise ParamsError(f"ingest.answer_patterns: need a non-empty subset of {list(ANSWER_PATTERNS)}")
        if not self.question_fields or not self.response_fields:
            raise ParamsError("ingest.question_fields and ingest.response_fields must name at least one field")


class Rejected(Exception):
    """A record that cannot become a trace: `reason` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _text(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"field {field!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise Rejected("empty_field", f"field {field!r} is empty")
    return value


def _first_text(record: dict, fields: tuple[str, ...], role: str) -> str:
    for field in fields:
        if record.get(field) is not None:
            return _text(record, field)
    raise Rejected("missing_field", f"no {role} field; looked for {list(fields)}")


def _chat(messages: Any) -> tuple[list[dict], str, str]:
    """(prompt turns, question, response) of a chat record: the response is the last assistant turn."""
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise Rejected("wrong_type", "messages must be a list of {role: str, content: str}")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        raise Rejected("no_assistant_turn", "chat record has no assistant turn to score")
    prompt, response = turns[:last], turns[last]["content"]
    questions = [m["content"] for m in prompt if m["role"] == "user"]
    if not questions:
        raise Rejected("missing_field", "chat record has no user turn before the last assistant turn")
    if not response.strip() or not questions[-1].strip():
        raise Rejected("empty_field", "the last assistant turn or the last user turn is empty")
    return prompt, questions[-1], response


def _record_id(record: dict, params: Params) -> str | None:
    if params.id_field is None or record.get(params.id_field) is None:
        return None
    given = record[params.id_field]
    if isinstance(given, bool) or not isinstance(given, (str, int)):
        raise Rejected("wrong_type", f"id field {params.id_field!r} is {type(given).__name__}")
    if not str(given).strip():
        raise Rejected("empty_field", f"id field {params.id_field!r} is empty")
    if str(given).splitlines() != [str(given)]:
        # ids.txt holds one id a line: an id with a line break would split there and match no trace
        raise Rejected("id_line_break", f"id field {params.id_field!r} holds a line break: {given!r}")
    return str(given)


def to_trace(record: dict, params: Params) -> dict[str, str]:
    """One input record -> the TRACE_SCHEMA text columns (all but source_row); raises Rejected."""
    if params.messages_field is not None and record.get(params.messages_field) is not None:
        prompt, question, response = _chat(record[params.messages_field])
    else:
        question = _first_text(record, params.question_fields, "question")
        response = _first_text(record, params.response_fields, "response")
        prompt = [{"role": "user", "content": question}]
    given = record.get(params.answer_field) if params.answer_field is not None else None
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (str, int, float)):
            raise Rejected("wrong_type", f"answer field {params.answer_field!r} is {type(given).__name__}")
        value = normalise_answer(str(given))
        found = (value, "field") if value else None
    else:
        found = extract_final_answer(response, params.answer_patterns)
    if found is None:
        raise Rejected("no_answer", f"no final answer in the response (patterns {list(params.answer_patterns)})")
    prompt_json = json.dumps(prompt, ensure_ascii=False)
    digest = content_hash(prompt_json, response)
    return {
        "id": _record_id(record, params) or "h-" + digest[:16],
        "content_hash": digest,
        "question": question,
        "prompt_messages": prompt_json,
        "response": response,
        "final_answer": found[0],
        "answer_source": found[1],
        # default=str: Parquet values JSON cannot hold (timestamps, bytes) are carried as text.
        "raw": json.dumps(record, ensure_ascii=False, default=str),
    }


def _quarantine(ledger: StageLedger, rejected: Rejected, row: int, record: dict, params: Params,
                trace_id: str | None = None) -> None:
    if trace_id is None:
        try:
            trace_id = _record_id(record, params)
        except Rejected:
            trace_id = None  # the id itself is unusable; source_row still locates the record
    ledger.reject(rejected.reason, rejected.detail, id=trace_id, source_row=row,
                  record=json.dumps(record, ensure_ascii=False, default=str))


def _mapping_hint(params: Params, fields_seen: set[str]) -> str:
    """The fields ingest looked for next to the fields the records have, for a run that kept nothing."""
    looked_for = {"question_fields": list(params.question_fields), "response_fields": list(params.response_fields),
                  "messages_field": params.messages_field, "answer_field": params.answer_field,
                  "id_field": params.id_field}
    looked = ", ".join(f"ingest.{name} {value!r}" for name, value in looked_for.items() if value is not None)
    return f". Looked for {looked}; the records have fields {sorted(fields_seen)}" if fields_seen else ""


@atomic_outputs
def ingest(input: Path, out_dir: Path, params: Params) -> dict:
    """Read an input dataset into outputs traces.parquet, quarantine.jsonl and stats.json."""
    ledger = StageLedger("ingest")
    columns: dict[str, list] = {name: [] for name in TRACE_SCHEMA.names}
    seen_ids: set[str] = set()
    sources: Counter[str] = Counter()
    fields_seen: set[str] = set()  # named when nothing is kept: a wrong field mapping shows at once
    for row, record in read_records(Path(input), params.format, ledger):
        fields_seen.update(record)
        try:
            trace = to_trace(record, params)
        except Rejected as rejected:
            _quarantine(ledger, rejected, row, record, params)
            continue
        if trace["id"] in seen_ids:
            rejected = Rejected("duplicate_id", f"id {trace['id']!r} was already kept from an earlier record")
            _quarantine(ledger, rejected, row, record, params, trace_id=trace["id"])
            continue
        seen_ids.add(trace["id"])
        sources[trace["answer_source"]] += 1
        columns["source_row"].append(row)
        for name, value in trace.items():
            columns[name].append(value)
        ledger.keep()
    ledger.require_kept(input, hint=_mapping_hint(params, fields_seen))
    out_dir = Path(out_dir)
    write_parquet(out_dir / "traces.parquet", pa.table(columns, schema=TRACE_SCHEMA))
    ledger.extra["answer_source"] = dict(sorted(sources.items()))
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


def main(argv: list[str] | None = None) -> dict:
    return run_stage(
        "ingest",
        Params,
        [("input", "JSONL / Parquet file or a datasets.save_to_disk directory"), ("out_dir", "output directory")],
        ingest,
        argv,
    )


if __name__ == "__main__":
    main()
