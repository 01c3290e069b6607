"""Stage 1, ingest: JSONL, JSON, Parquet or a saved Hugging Face dataset -> one canonical trace table.

Records are mapped by params.yaml `ingest` (plain question/response fields, or chat turns in
OpenAI `messages` {role, content} or ShareGPT/LLaVA `conversations` {from, value}), or by a named
`preset` that fills in those fields for a common layout (PRESETS below). The final answer is taken
from a field or extracted from the response (tasks/curate/answers.py), after its reasoning block where it
has one (segment.reasoning_tags: a marker inside <think> is a thought); a response with no answer marker is
kept with answer_source "none" and segment decides where its answer span lies. Each record becomes
one TRACE_SCHEMA row, or one row per solution where a `generations` list holds several (ids
<problem id>-<index>). A record that cannot become a trace is quarantined with a reason; stats.json
shows read = kept + quarantined, counting each solution of a generations list as one read. Input is
streamed (JSONL line by line, Parquet and Arrow in batches); kept rows are held as column lists and
written once. With ingest.image_root set, records with images become multimodal traces whose prompt
turns hold image parts with the sha256 of each image's bytes (tasks/curate/images.py).

    python -m tasks.curate.ingest --input data/gsm_noisy/pool.jsonl --out-dir outputs/ingest
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from tasks.core.schema import TRACE_SCHEMA, content_hash
from tasks.core.stage import (ParamsError, Stage, StageLedger, atomic_outputs, params_section, published_dir,
                              write_parquet)
from tasks.curate import images
from tasks.curate import segment as segment_stage
from tasks.curate.answers import ANSWER_PATTERNS, extract_final_answer, final_solution, normalise_answer
from tasks.curate.readers import read_records

__all__ = ["Params", "extract_final_answer", "ingest", "main"]

FORMATS = ("auto", "jsonl", "json", "parquet", "hf_disk", "hub")
# A preset fills in the keys of the section left at their defaults (a key set by hand wins), so each
# layout is one documented field mapping. README "Your own data" has one command per preset.
PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI chat: {"messages": [{"role", "content"}, ...]}; the last assistant turn is the response.
    "messages": {"messages_field": "messages"},
    # ShareGPT / LLaVA: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}.
    "sharegpt": {"messages_field": "conversations"},
    # Alpaca: {"instruction", "input", "output", "system"?, "history"?}; a non-empty input is appended to the
    # instruction, a system prompt (LLaMA-Factory's `system` column, export's alpaca.json) is a system turn
    # before it, and `history` [[user, assistant], ...] (LLaMA-Factory's multi-turn column) the earlier turns.
    "alpaca": {"question_fields": ("instruction",), "input_field": "input", "response_fields": ("output",),
               "system_field": "system", "history_field": "history"},
    # TRL's conversational prompt-completion (export's prompt_completion.jsonl): {"prompt": [turns],
    # "completion": [{"role": "assistant", ...}]}; prompt turns and completion read as one chat.
    "prompt_completion": {"question_fields": ("prompt",), "response_fields": ("completion",), "messages_field": None},
    # export's data.parquet: {"id", "prompt_messages": [turns], "response", "score", "rank"}.
    "grace_parquet": {"question_fields": ("prompt_messages",), "response_fields": ("response",),
                      "messages_field": None},
    # MetaMathQA: {"query", "response" ending "The answer is: X", "type", "original_question"}.
    "metamath": {"question_fields": ("query",), "response_fields": ("response",), "answer_patterns": ("answer_is",)},
    # NuminaMath / OpenR1-Math: {"problem", "solution" with \boxed{}, "generations": [...], "uuid"};
    # each generation is its own trace (the solution only where there are none); their own
    # `messages` copy of a generation is not read, but in the kept record it holds the selected one, and
    # the per-generation lists hold only its entry.
    "numina": {"id_field": "uuid", "question_fields": ("problem",), "response_fields": ("solution",),
               "generations_field": "generations", "messages_field": None, "answer_patterns": ("boxed", "answer_is"),
               "generation_fields": ("messages", "correctness_math_verify", "correctness_llama",
                                     "is_reasoning_complete", "finish_reasons")},
    # Multiple choice (AQuA-RAT style): {"question", "options": ["A) 21", ...] or {"A": ...}, "rationale",
    # "correct": "B"}; the options are appended to the question, the answer is a letter.
    "multiple_choice": {"question_fields": ("question",), "options_field": "options",
                        "response_fields": ("rationale", "response", "solution"), "answer_field": "correct",
                        "answer_patterns": ("choice", "answer_is", "boxed")},
}
# ShareGPT speaker names -> OpenAI roles (LLaVA uses the same human/gpt pair).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system"}
OPTION_LETTERS = "ABCDEFGHIJ"


@params_section("ingest")
class Params:
    format: str = "auto"  # auto (by suffix; a directory = HF dataset on disk) | jsonl | parquet | hf_disk | hub
    split: str | None = None  # the split of a DatasetDict (saved or hub) to read; null: its only split
    id_field: str | None = "id"  # null or missing: id = "h-" + 16 hex of the content hash
    question_fields: tuple[str, ...] = ("question", "prompt", "instruction", "problem")  # first present wins
    response_fields: tuple[str, ...] = ("answer", "response", "solution", "output", "completion")
    answer_field: str | None = None  # null = extract from the response; a missing value falls back to that
    messages_field: str | None = "messages"  # chat records: prompt = turns before the last assistant turn
    answer_patterns: tuple[str, ...] = ("gsm8k", "answer_is", "boxed")  # tried in this order
    preset: str | None = None  # a named layout (PRESETS) filling the keys left at their defaults
    input_field: str | None = "input"  # Alpaca's second half of the question, appended when non-empty
    system_field: str | None = None  # a system prompt field: a system turn before the question where non-empty
    history_field: str | None = None  # Alpaca's earlier turns, [[user, assistant], ...]: placed before the question
    generations_field: str | None = None  # a list of solutions per problem: one trace each
    # fields that follow the generation in each trace's record (raw, the subsets' own format): a list as long
    # as generations keeps only the selected entry; a chat list gets it as its last assistant turn
    generation_fields: tuple[str, ...] = ()
    # true: an exact repeat (same prompt turns and response) of a kept trace is quarantined (duplicate_response);
    # false keeps repeats, e.g. when they are meant to weigh a rejection-sampled answer twice
    drop_duplicate_responses: bool = True
    options_field: str | None = None  # multiple-choice options, appended to the question as "A) ..." lines
    # null: image fields are ignored (text-only, as before); a directory: records with images are read as
    # multimodal traces (tasks/curate/images.py), their image paths relative to it. The traces record each
    # file relative to the working directory (images.recorded_path), however image_root is spelled
    image_root: str | None = None
    # an image whose header claims more pixels is quarantined (image_too_large) before it is decoded: a
    # decompression bomb costs nothing, and extract's memory stays bounded (a 144-megapixel image took it from
    # 0.6 to 3.1 GB). Higher keeps larger scans whole; the VLM's processor resizes them anyway. null: Pillow's limit
    max_image_pixels: int | None = 25_000_000

    def resolved(self) -> "Params":
        """These params with the preset's mapping in the keys left at their defaults."""
        if self.preset is None:
            return self
        defaults = Params()
        return dataclasses.replace(self, **{key: value for key, value in PRESETS[self.preset].items()
                                            if getattr(self, key) == getattr(defaults, key)})

    def check(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ParamsError(f"ingest.preset: {self.preset!r} is not null or one of {list(PRESETS)}")
        if self.format not in FORMATS:
            raise ParamsError(f"ingest.format: {self.format!r} is not one of {list(FORMATS)}")
        unknown = [p for p in self.answer_patterns if p not in ANSWER_PATTERNS]
        if unknown or not self.answer_patterns:
            raise ParamsError(f"ingest.answer_patterns: need a non-empty subset of {list(ANSWER_PATTERNS)}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ParamsError(f"ingest.max_image_pixels: {self.max_image_pixels} must be null or at least 1")
        if not self.question_fields or not self.response_fields:
            raise ParamsError("ingest.question_fields and ingest.response_fields must name at least one field")


@params_section("data")
class DataParams:
    """params.yaml's `data` section: which corpus `dvc repro` curates. dvc.yaml passes it to ingest as
    --input (so DVC tracks the file); declared here so the section is typed and known like any other."""

    pool: str = "data/gsm_noisy/pool.jsonl"  # a JSONL/JSON/Parquet file or a HF dataset directory
    # the directory of the pool's image files, a dep of ingest (an edited image re-runs it): a multimodal pool's
    # ingest.image_root; a text pool has none, and dvc.yaml needs an existing path, so an empty stand-in
    images: str = "data/no_images"
    # the fine-tune table's held-out problems (finetune/dvc.yaml test_set), read with the pool's ingest settings
    test: str = "data/gsm_noisy/test.jsonl"
    # the pool's labels ({"id", "corrupted", ...} per line): the fine-tune table's calibration rows and the diagnostics
    # read them, curation never does; data/no_labels.jsonl (empty) for an unlabelled corpus
    labels: str = "data/gsm_noisy/labels.jsonl"


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


def _hint(record: dict) -> str:
    """What the record holds, and the preset its chat field suggests: the detail of a missing field."""
    hint = f"; the record has fields {sorted(record)}"
    for field, preset in (("conversations", "sharegpt"), ("messages", "messages")):
        if isinstance(record.get(field), list):
            hint += f" (for chat turns in {field!r}, set ingest.preset: {preset})"
    return hint


def _first_text(record: dict, fields: tuple[str, ...], role: str) -> str:
    for field in fields:
        if record.get(field) is not None:
            return _text(record, field)
    raise Rejected("missing_field", f"no {role} field; looked for {list(fields)}{_hint(record)}")


def _response_text(record: dict, fields: tuple[str, ...]) -> str:
    """The response: the one response field present, or of several the longest text. A {question, response,
    answer} record's one-token `answer` is the final answer, not the reasoning to score."""
    texts = [f for f in fields if isinstance(record.get(f), str) and record[f].strip()]
    if len(texts) > 1:
        return record[max(texts, key=lambda f: len(record[f].strip()))]  # the first of equally long ones
    return _first_text(record, fields, "response")


def _content_text(content: Any, field: str, index: int) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}, ...] as one text (parts joined by a line break);
    any other value is returned as it is for _turn to judge."""
    if not (isinstance(content, list) and content and all(isinstance(part, dict) for part in content)):
        return content
    other = sorted({str(part.get("type")) for part in content if part.get("type") != "text"})
    if other:
        raise Rejected("wrong_type", f"{field}[{index}] content holds parts of type {other}; only text parts are "
                                     "read as text (set ingest.image_root for image parts)")
    if not all(isinstance(part.get("text"), str) for part in content):
        raise Rejected("wrong_type", f"{field}[{index}] content holds a text part without a string `text`")
    return "\n".join(part["text"] for part in content)


def _turn(message: Any, field: str, index: int) -> dict:
    """One chat turn as {role, content}, from OpenAI {role, content} (a string or text parts) or ShareGPT
    {from, value}."""
    if isinstance(message, dict) and isinstance(message.get("role"), str):
        message = {**message, "content": _content_text(message.get("content"), field, index)}
    if isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str):
        return {"role": message["role"], "content": message["content"]}
    if isinstance(message, dict) and isinstance(message.get("from"), str) and isinstance(message.get("value"), str):
        role = SHAREGPT_ROLES.get(message["from"].lower())
        if role is None:
            raise Rejected("unknown_role", f"{field}[{index}]: speaker {message['from']!r} is not one of "
                                           f"{sorted(SHAREGPT_ROLES)}")
        return {"role": role, "content": message["value"]}
    keys = sorted(message) if isinstance(message, dict) else type(message).__name__
    raise Rejected("wrong_type", f"{field}[{index}] is {keys}; a turn needs string role/content (OpenAI) "
                                 "or from/value (ShareGPT)")


def _chat(messages: Any, field: str = "messages") -> tuple[list[dict], str, str]:
    """(prompt turns, question, response) of a chat record: the response is the last assistant turn."""
    if not isinstance(messages, list):
        raise Rejected("wrong_type", f"field {field!r} is {type(messages).__name__}, not a list of turns")
    turns = [_turn(message, field, index) for index, message in enumerate(messages)]
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


def _options(options: Any, field: str) -> str:
    """Multiple-choice options as lines "A) text": a list (lettered in order, or already "A) ...") or a dict."""
    if isinstance(options, dict) and options and all(isinstance(v, str) for v in options.values()):
        return "\n".join(f"{letter}) {text}" for letter, text in options.items())
    if isinstance(options, list) and 0 < len(options) <= len(OPTION_LETTERS) and all(isinstance(o, str) for o in options):
        lettered = all(o.strip()[:2] in (f"{l})", f"{l}.", f"({l}") for o, l in zip(options, OPTION_LETTERS))
        return "\n".join(o.strip() if lettered else f"{l}) {o.strip()}" for o, l in zip(options, OPTION_LETTERS))
    raise Rejected("wrong_type", f"options field {field!r} must be a non-empty list or dict of strings "
                                 f"(at most {len(OPTION_LETTERS)} options)")


def _question(record: dict, params: Params) -> str:
    question = _first_text(record, params.question_fields, "question")
    extra = record.get(params.input_field) if params.input_field is not None else None
    if extra is not None:
        if not isinstance(extra, str):
            raise Rejected("wrong_type", f"input field {params.input_field!r} is {type(extra).__name__}, not a string")
        if extra.strip():  # Alpaca: the problem itself often sits in `input`, the instruction only frames it
            question = f"{question}\n\n{extra}"
    if params.options_field is not None and record.get(params.options_field) is not None:
        question = f"{question}\n{_options(record[params.options_field], params.options_field)}"
    return question


def to_trace(record: dict, params: Params, response: str | None = None,
             store: images.ImageStore | None = None, reasoning_tags: tuple[str, ...] = ()) -> dict[str, str]:
    """One input record -> the TRACE_SCHEMA text columns (all but source_row); raises Rejected.

    `response` overrides the record's response fields (one solution of a generations list); `store`
    resolves a multimodal record's images (tasks/curate/images.py), by default against ingest.image_root;
    `reasoning_tags` (segment.reasoning_tags) mark the reasoning block an answer marker is not read from."""
    if params.image_root is not None and images.has_images(record, params.messages_field):
        try:
            return _multimodal_trace(record, params, response, store, reasoning_tags)
        except images.ImageRejected as rejected:
            raise Rejected(rejected.reason, rejected.detail) from None
    return _text_trace(record, params, response, reasoning_tags)


def _multimodal_trace(record: dict, params: Params, response: str | None, store: images.ImageStore | None,
                      reasoning_tags: tuple[str, ...]) -> dict:
    """A record with images: its text mapped as any record's, then the images placed in its prompt turns."""
    flat, sources = images.flatten(record, params.messages_field)
    trace = _text_trace(flat, params, response, reasoning_tags)
    if images.PLACEHOLDER in trace["response"]:  # images are context: one in the scored turn has no place there
        raise images.ImageRejected("image_in_response", f"the response holds {images.PLACEHOLDER} (an image in the "
                                   "assistant turn); only prompt turns may hold images")
    store = store or images.ImageStore(Path(params.image_root), max_pixels=params.max_image_pixels)
    prompt = images.place(json.loads(trace["prompt_messages"]), sources, store)
    prompt_json = json.dumps(prompt, ensure_ascii=False)
    digest = content_hash(prompt_json, trace["response"])  # the parts' sha256 put the image bytes in the hash
    given_id = _record_id(record, params)
    return {**trace, "id": given_id or "h-" + digest[:16], "content_hash": digest, "prompt_messages": prompt_json,
            "question": trace["question"].replace(images.PLACEHOLDER, "").strip(),
            "raw": json.dumps(images.raw_record(record), ensure_ascii=False, default=str)}


def _conversation(record: dict, params: Params) -> tuple[list, str] | None:
    """(turns, field names) where the question field holds a list of turns (TRL's prompt, export's
    prompt_messages): they and the response (a list of turns, or one text) are one chat; else None."""
    question = next((f for f in params.question_fields if record.get(f) is not None), None)
    response = next((f for f in params.response_fields if record.get(f) is not None), None)
    if question is None or response is None or not isinstance(record[question], list):
        return None
    answer = record[response]
    turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    return record[question] + turns, f"{question}+{response}"


def _history(record: dict, params: Params) -> list[dict]:
    """The turns of an Alpaca `history` [[user, assistant], ...] (LLaMA-Factory's convention), oldest first."""
    pairs = record.get(params.history_field) if params.history_field is not None else None
    if pairs is None:
        return []
    if not (isinstance(pairs, list) and all(isinstance(pair, list) and len(pair) == 2
                                            and all(isinstance(text, str) for text in pair) for pair in pairs)):
        raise Rejected("wrong_type", f"history field {params.history_field!r} must be a list of [user, assistant] "
                                     "string pairs")
    return [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)]


def _text_trace(record: dict, params: Params, response: str | None = None,
                reasoning_tags: tuple[str, ...] = ()) -> dict[str, str]:
    if params.messages_field is not None and record.get(params.messages_field) is not None:
        prompt, question, response = _chat(record[params.messages_field], params.messages_field)
    elif response is None and (conversation := _conversation(record, params)) is not None:
        prompt, question, response = _chat(*conversation)
    else:
        question = _question(record, params)
        if response is None:
            response = _response_text(record, params.response_fields)
        elif not response.strip():
            raise Rejected("empty_field", f"generation in {params.generations_field!r} is empty")
        prompt = [*_history(record, params), {"role": "user", "content": question}]
        system = record.get(params.system_field) if params.system_field is not None else None
        if system is not None and not isinstance(system, str):
            raise Rejected("wrong_type", f"system field {params.system_field!r} is {type(system).__name__}")
        if system and system.strip():
            prompt.insert(0, {"role": "system", "content": system})
    given = record.get(params.answer_field) if params.answer_field is not None else None
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (str, int, float)):
            raise Rejected("wrong_type", f"answer field {params.answer_field!r} is {type(given).__name__}")
        value = normalise_answer(str(given))
        found = (value, "field") if value else None
    else:
        # after the reasoning block only, where segment places the answer span: a marker inside it ("the answer
        # is 5? No.") is a thought, and a final solution without one is kept like any marker-less response
        found = extract_final_answer(final_solution(response, reasoning_tags), params.answer_patterns)
    if found is None:  # kept: segment's answer_fallback places its answer span, or quarantines it
        found = ("", "none")
    options = record.get(params.options_field) if params.options_field is not None else None
    if options is not None and len(found[0]) == 1 and found[0] in OPTION_LETTERS:
        letters = list(options) if isinstance(options, dict) else list(OPTION_LETTERS[:len(options)])
        if found[0] not in letters:  # _question has checked the options' shape
            raise Rejected("answer_not_in_options", f"answer {found[0]!r} ({found[1]}) is not one of the options "
                                                    f"{letters}")
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


def _candidates(record: dict, params: Params) -> list[tuple[dict, str | None, str | None]]:
    """(record, response override, id) per trace of one record: one per solution of a generations list."""
    generations = record.get(params.generations_field) if params.generations_field is not None else None
    if generations is None:
        return [(record, None, None)]
    if not isinstance(generations, list):
        raise Rejected("wrong_type", f"generations field {params.generations_field!r} is "
                                     f"{type(generations).__name__}, not a list")
    if not generations:
        raise Rejected("empty_field", f"generations field {params.generations_field!r} is an empty list")
    base = _record_id(record, params) or "h-" + content_hash(json.dumps(_question(record, params)), "")[:16]
    # raw: the record with only this solution, so a subset written in the input's format holds one each
    return [(_one_generation(record, params, index, text), text, f"{base}-{index}")
            for index, text in enumerate(generations)]


def _one_generation(record: dict, params: Params, index: int, text: Any) -> dict:
    """The record as if it held generation `index` only: generations_field and every generation_fields
    entry follow it (a per-generation list keeps its entry, a chat copy gets it as the last assistant turn)."""
    one = {**record, params.generations_field: [text]}
    n = len(record[params.generations_field])
    for field in params.generation_fields:
        value = record.get(field)
        if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            last = max((i for i, m in enumerate(value) if m["role"] == "assistant"), default=len(value))
            one[field] = [*value[:last], {**(value[last] if last < len(value) else {"role": "assistant"}),
                                          "content": text}, *value[last + 1:]]
        elif isinstance(value, list) and len(value) == n:
            one[field] = [value[index]]
    return one


def _mapping_hint(params: Params, fields_seen: set[str]) -> str:
    """The fields ingest looked for next to the fields the records have, for a run that kept nothing."""
    looked_for = {"question_fields": list(params.question_fields), "response_fields": list(params.response_fields),
                  "messages_field": params.messages_field, "answer_field": params.answer_field,
                  "id_field": params.id_field}
    looked = ", ".join(f"ingest.{name} {value!r}" for name, value in looked_for.items() if value is not None)
    return f". Looked for {looked}; the records have fields {sorted(fields_seen)}" if fields_seen else ""


@atomic_outputs
def ingest(input: Path, out_dir: Path, params: Params, segment: segment_stage.Params | None = None) -> dict:
    """Read an input dataset into outputs traces.parquet, quarantine.jsonl and stats.json.

    `segment`: its reasoning_tags say where a response's reasoning block ends (default: segment's defaults)."""
    params, out_dir = params.resolved(), Path(out_dir)
    reasoning_tags = (segment or segment_stage.Params()).reasoning_tags
    ledger = StageLedger("ingest")
    columns: dict[str, list] = {name: [] for name in TRACE_SCHEMA.names}
    seen: dict[str, str] = {}  # "id:<id>" and "hash:<content hash>" of kept traces -> the id kept first
    sources: Counter[str] = Counter()
    # the pool as the dataset cards cite it: the path as given, and the sha256 of its bytes (None for a hub id)
    ledger.extra.update(preset=params.preset, generations_expanded=0, input=Path(input).as_posix(),
                        input_sha256=source_sha256(Path(input)))
    fields_seen: set[str] = set()  # named when nothing is kept: a wrong field mapping shows at once
    store = images.ImageStore(Path(params.image_root or "."), out_dir / "images", published_dir(out_dir) / "images",
                              max_pixels=params.max_image_pixels)
    for row, source_record in read_records(Path(input), params.format, ledger, params.split):
        fields_seen.update(source_record)
        try:
            candidates = _candidates(source_record, params)
        except Rejected as rejected:
            _quarantine(ledger, rejected, row, source_record, params)
            continue
        ledger.count_read(len(candidates) - 1)  # each solution of a generations list is one read
        ledger.extra["generations_expanded"] += len(candidates) - 1
        for record, response, trace_id in candidates:
            try:
                if trace_id is not None and not isinstance(response, str):
                    raise Rejected("null_generation" if response is None else "wrong_type",
                                   f"generation {trace_id} is {type(response).__name__}, not a string")
                trace = to_trace(record, params, response, store, reasoning_tags)
            except Rejected as rejected:
                _quarantine(ledger, rejected, row, record, params, trace_id=trace_id)
                continue
            if trace_id is not None:
                trace["id"] = trace_id
            _keep(trace, row, columns, seen, sources, ledger, record, params)
    ledger.require_kept(input, hint=_mapping_hint(params, fields_seen))
    write_parquet(out_dir / "traces.parquet", pa.table(columns, schema=TRACE_SCHEMA))
    ledger.extra["answer_source"] = dict(sorted(sources.items()))
    if store.digests or store.written:  # multimodal input only: a text run's stats stay as they were
        ledger.extra.update(images_read=len(store.digests), images_embedded=store.written)
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


def source_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes, or of a directory's files (relative path and bytes, in path order)."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _keep(trace: dict, row: int, columns: dict[str, list], seen: dict[str, str], sources: Counter,
          ledger: StageLedger, record: dict, params: Params) -> None:
    rejected = None
    if "id:" + trace["id"] in seen:
        rejected = Rejected("duplicate_id", f"id {trace['id']!r} was already kept from an earlier record")
    elif params.drop_duplicate_responses and "hash:" + trace["content_hash"] in seen:
        first = seen["hash:" + trace["content_hash"]]
        rejected = Rejected("duplicate_response", f"the same prompt and response as {first!r}, kept earlier "
                                                  "(ingest.drop_duplicate_responses)")
    if rejected is not None:
        _quarantine(ledger, rejected, row, record, params, trace_id=trace["id"])
        return
    seen["id:" + trace["id"]] = trace["id"]
    seen.setdefault("hash:" + trace["content_hash"], trace["id"])
    sources[trace["answer_source"]] += 1
    columns["source_row"].append(row)
    for name, value in trace.items():
        columns[name].append(value)
    ledger.keep()


STAGE = Stage(ingest, Params, paths=[
    ("input", "JSONL / JSON / Parquet file or a datasets.save_to_disk directory"),
    ("out_dir", "output directory"),
], extra_sections=[("segment", segment_stage.Params)])


def main(argv: list[str] | None = None) -> dict:
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
