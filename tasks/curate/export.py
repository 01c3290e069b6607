"""Stage `export`: every selected subset in the formats post-training tools read.

    python -m tasks.curate.export --subsets outputs/select/subsets \
        --segments outputs/segment/segments.parquet --out-dir outputs/export

Per subset, under subsets/<name>/, rows in the subset's rank order (ids.txt):
  messages.jsonl  {"messages": [...prompt turns..., {"role": "assistant", "content": response}], "id": ...}
                  (the chat format of TRL's SFTTrainer, axolotl and LLaMA-Factory's OpenAI-style sharegpt)
  prompt_completion.jsonl  {"prompt": [...prompt turns...], "completion": [{"role": "assistant", ...}], "id": ...}
                  (TRL's conversational prompt-completion format: SFTTrainer then puts the loss on the
                  completion only, which messages.jsonl cannot give under a chat template with no
                  generation markers, SmolLM2's among them)
  alpaca.json     [{"id", "instruction": question, "input": "", "output": response, "system": system turn,
                  "history": [[user, assistant], ...], "score", "rank"}, ...] ("system" only where the prompt
                  has one, "history" only where it has earlier turns: LLaMA-Factory's alpaca `system` and
                  `history` columns; the question already holds an ingested Alpaca input, so "input" stays empty)
  sharegpt.jsonl  {"id", "conversations": [{"from": "system"|"human"|"gpt", "value"}, ...], "score", "rank"}
                  (ShareGPT: LLaMA-Factory's sharegpt formatting with its default tags, FastChat, axolotl)
  data.parquet    id, prompt_messages (list of {role, content}), response, score, rank
Each file reads back through ingest with its preset (messages, prompt_completion, alpaca, sharegpt, grace_parquet)
to the same ids and content hashes. Beside the files each subset gets
  README.md           a dataset card: YAML front matter (Hugging Face `configs`, one per file; under `grace`
                      the source file and its sha256, the scoring model's identity, the subset's rule,
                      threshold and counts, the settings that shaped the score) and a short description
  dataset_info.json   LLaMA-Factory's dataset registry for the folder (`--dataset_dir` it)
citing what the stages recorded under --outputs (optional: "not recorded" without it).
Multimodal traces (ingest.image_root, tasks/curate/images.py) keep their image files: messages.jsonl and
prompt_completion.jsonl get {"type": "image"} parts in the turns and the files in "images" (TRL,
LLaMA-Factory), alpaca.json "<image>" placeholders in the instruction and "images", data.parquet an
`images` column, and each subset also gets
  llava.json      [{"id", "image": file (a list where several), "conversations": [{"from", "value"}, ...]}, ...]
                  (LLaVA's training layout: "<image>" placeholders in the human turn)
The image files are named as ingest recorded them (tasks/curate/images.py recorded_path): relative to the
repository root where they lie inside it, so a trainer reads them from a clone's root (LLaVA's
--image_folder); absolute only for files outside the checkout.
A text-only run writes exactly what it wrote before: no llava.json, no `images` key or column.
The response is the trace as given (calculator annotations included), not the scored text.
A prompt that is not (system?) (user, assistant)* user, e.g. two user turns in a row, has no Alpaca form: it
is quarantined for alpaca only (reason alpaca_multi_turn) and still exported in the other formats.
Counts are per row to write (subset x format x id): read = kept + quarantined.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from tasks.core.schema import EXPORT_SCHEMA
from tasks.core.stage import ParamsError, Stage, StageLedger, atomic_outputs, params_section, write_parquet
from tasks.curate import images
from tasks.curate.runinfo import read_json, run_settings

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "parquet")
FILE_NAMES = {"messages": "messages.jsonl", "prompt_completion": "prompt_completion.jsonl", "alpaca": "alpaca.json",
              "sharegpt": "sharegpt.jsonl", "parquet": "data.parquet", "llava": "llava.json"}
IMAGE_FORMATS = ("llava",)  # written besides export.formats where the export holds multimodal traces
LLAVA_SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}


IMAGES_FIELD = pa.field("images", pa.list_(pa.string()), nullable=False)  # multimodal exports only


@params_section("export")
class Params:
    formats: tuple[str, ...] = FORMATS  # which files each subset gets

    def check(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ParamsError(f"export.formats: {list(self.formats)} must be a non-empty list drawn from {list(FORMATS)}")


def to_alpaca(prompt: list[dict], question: str, response: str) -> dict | None:
    """Alpaca form of a (system?) (user, assistant)* user prompt; None for any other shape. The earlier turns
    go to `history` as [[user, assistant], ...] (LLaMA-Factory's alpaca convention), oldest first."""
    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
    turns = prompt[1:] if system is not None else prompt
    pairs = len(turns) // 2
    if [m["role"] for m in turns] != ["user", "assistant"] * pairs + ["user"]:
        return None
    record = {"instruction": question, "input": "", "output": response}
    history = [[turns[2 * i]["content"], turns[2 * i + 1]["content"]] for i in range(pairs)]
    return record | ({"system": system} if system is not None else {}) | ({"history": history} if history else {})


def alpaca_row(id_: str, record: dict, ranked: dict) -> dict:
    """An Alpaca record with the id (ingest's id_field reads it back) and the trace's score and rank."""
    return {"id": id_, **record, "score": ranked["score"], "rank": ranked["rank"]}


def export_subset(ids: list[str], traces: dict[str, dict], ranking: dict[str, dict], formats: tuple[str, ...],
                  ledger: StageLedger, subset: str) -> dict[str, bytes | pa.Table]:
    """The requested files of one subset, as bytes; every row counted or quarantined in `ledger`."""
    rows: dict[str, list] = {fmt: [] for fmt in formats}
    for id_ in ids:
        ledger.count_read(len(formats))
        trace, ranked = traces.get(id_), ranking.get(id_)
        if trace is None or ranked is None:
            reason, source = ("id_not_in_segments", "segments.parquet") if trace is None else \
                ("id_not_in_ranking", "ranking.parquet")
            for fmt in formats:
                ledger.reject(reason, f"subset {subset}, format {fmt}: {id_} has no row in {source}", id=id_)
            continue
        prompt = json.loads(trace["prompt_messages"])
        image_files = images.image_paths(prompt)
        extra = {"images": image_files} if image_files else {}  # a text trace's rows are as before
        flat = [{**m, "content": images.placeholder_text(m["content"])} for m in prompt]  # "<image>" placeholders
        for fmt in formats:
            if fmt == "messages":
                messages = images.sft_turns(prompt) + [{"role": "assistant", "content": trace["response"]}]
                rows[fmt].append(json.dumps({"messages": messages, "id": id_, **extra}, ensure_ascii=False) + "\n")
            elif fmt == "prompt_completion":
                completion = [{"role": "assistant", "content": trace["response"]}]
                rows[fmt].append(json.dumps({"prompt": images.sft_turns(prompt), "completion": completion, "id": id_,
                                             **extra}, ensure_ascii=False) + "\n")
            elif fmt in ("llava", "sharegpt"):
                turns = flat + [{"role": "assistant", "content": trace["response"]}]
                conversations = [{"from": LLAVA_SPEAKERS.get(m["role"], m["role"]), "value": m["content"]}
                                 for m in turns]
                if fmt == "llava":
                    image = {"image": image_files[0] if len(image_files) == 1 else image_files} if image_files else {}
                    rows[fmt].append({"id": id_, **image, "conversations": conversations})
                else:
                    rows[fmt].append(json.dumps({"id": id_, "conversations": conversations, **extra,
                                                 "score": ranked["score"], "rank": ranked["rank"]},
                                                ensure_ascii=False) + "\n")
            elif fmt == "alpaca":
                question = flat[-1]["content"] if image_files else trace["question"]
                record = to_alpaca(flat, question, trace["response"])
                record = record if record is None else alpaca_row(id_, record, ranked) | extra
                if record is None:
                    roles = [m["role"] for m in prompt]
                    ledger.reject("alpaca_multi_turn", f"subset {subset}: prompt roles {roles} have no Alpaca form",
                                  id=id_, record=trace["prompt_messages"])
                    continue
                rows[fmt].append(record)
            else:
                row = {"id": id_, "prompt_messages": flat, "response": trace["response"], "score": ranked["score"],
                       "rank": ranked["rank"]}
                rows[fmt].append(row | {"images": image_files} if "llava" in formats else row)
            ledger.keep()
    files = {}
    for fmt in ("messages", "prompt_completion", "sharegpt"):
        if fmt in rows:
            files[fmt] = "".join(rows[fmt]).encode("utf-8")
    for fmt in ("alpaca", "llava"):
        if fmt in rows:
            files[fmt] = (json.dumps(rows[fmt], ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    if "parquet" in rows:  # a multimodal export (llava among the formats) adds the images column
        schema = EXPORT_SCHEMA.append(IMAGES_FIELD) if "llava" in formats else EXPORT_SCHEMA
        files["parquet"] = pa.Table.from_pylist(rows["parquet"], schema=schema)
    ledger.extra.setdefault("rows", {})[subset] = {fmt: len(r) for fmt, r in rows.items()}
    return files


# LLaMA-Factory reads OpenAI-style turns as its sharegpt formatting with these tags
LLAMA_FACTORY_CHAT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}


def dataset_info(subset: str, formats: tuple[str, ...], multimodal: bool, history: bool = False) -> dict:
    """LLaMA-Factory's dataset_info.json for a subset folder: its chat, Alpaca and ShareGPT files, images where
    there are. A multimodal messages.jsonl holds content parts, which LLaMA-Factory does not read: not listed then.
    `history`: some alpaca.json row has earlier turns. The column is declared only then: LLaMA-Factory looks a
    declared column up in every row it loads, and a file whose rows never hold it has no such column."""
    images_column = {"images": "images"} if multimodal else {}
    info = {}
    if "messages" in formats and not multimodal:
        info[f"{subset}_messages"] = {"file_name": FILE_NAMES["messages"], "formatting": "sharegpt",
                                      "columns": {"messages": "messages"}, "tags": LLAMA_FACTORY_CHAT_TAGS}
    if "alpaca" in formats:
        columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
        info[f"{subset}_alpaca"] = {"file_name": FILE_NAMES["alpaca"], "formatting": "alpaca",
                                    "columns": columns | ({"history": "history"} if history else {}) | images_column}
    if "sharegpt" in formats:  # human/gpt/system under from/value: LLaMA-Factory's default sharegpt tags
        info[f"{subset}_sharegpt"] = {"file_name": FILE_NAMES["sharegpt"], "formatting": "sharegpt",
                                      "columns": {"messages": "conversations"} | images_column}
    return info


def dataset_card(subset: str, rows: dict[str, int], outputs: Path | None) -> str:
    """README.md of a subset: Hugging Face card metadata, then where the traces came from and how they were chosen."""
    recorded = (lambda rel: read_json(outputs / rel)) if outputs is not None else (lambda rel: {})
    source, model, manifest = recorded("ingest/stats.json"), recorded("model/model_info.json"), \
        recorded("select/manifest.json")
    entry = manifest.get("subsets", {}).get(subset, {})
    rule = (f"the top {entry['fraction'] * 100:g}% of traces" if "fraction" in entry else
            f"a budget of {entry['token_budget']} response tokens" if "token_budget" in entry else "not recorded")
    files = [FILE_NAMES[fmt] for fmt in rows]
    where = f"`{source['input']}`" if source.get("input") else "an unrecorded source"
    grace = {
        "source": {"file": source.get("input"), "sha256": source.get("input_sha256"), "preset": source.get("preset"),
                   "read": source.get("read"), "kept": source.get("kept"), "quarantined": source.get("quarantined")},
        "model": {"source": model.get("source"), "identity": model.get("identity")},
        "selection": {"rule": rule, "method": manifest.get("method"), "n_scored": manifest.get("n_scored"),
                      "n_selected": entry.get("n_selected"), "n_tokens": entry.get("n_tokens"),
                      "score_threshold": entry.get("score_threshold")},
        "settings": dict(run_settings(outputs)) if outputs is not None else {},
        "rows": dict(rows),
    }
    front = {"pretty_name": f"GRACE-curate subset {subset}",
             "configs": [{"config_name": fmt, "data_files": FILE_NAMES[fmt]} | ({"default": True} if i == 0 else {})
                         for i, fmt in enumerate(rows)],
             "grace": grace}
    n = entry.get("n_selected", max(rows.values(), default=0))
    body = (f"# GRACE-curate subset {subset}\n\n{n} reasoning traces from {where}, {rule} of the "
            f"{manifest.get('n_scored', '?')} scored (score method {manifest.get('method', '?')}, scoring model "
            f"`{model.get('source')}`), best first. Files: {', '.join(f'`{name}`' for name in files)}; "
            "`dataset_info.json` registers them for LLaMA-Factory.\n\n"
            "The score says how well each step's gradient agrees with the final answer's and with the steps before "
            "it; it does not check that a step or the answer is correct.\n")
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


@atomic_outputs
def export(subsets: Path, segments: Path, out_dir: Path, params: Params, outputs: Path | None = None) -> dict:
    """Write every subset of select's output in the configured post-training formats."""
    names = sorted(p.parent.name for p in subsets.glob("*/ids.txt"))
    if not names:
        raise FileNotFoundError(f"export: no <subset>/ids.txt under {subsets}; run select first")
    ids_of = {name: (subsets / name / "ids.txt").read_text(encoding="utf-8").splitlines() for name in names}
    wanted = sorted({id_ for ids in ids_of.values() for id_ in ids})
    columns = ["id", "question", "prompt_messages", "response"]
    table = pq.read_table(segments, columns=columns, filters=pc.field("id").isin(wanted))
    traces = {row["id"]: row for row in table.to_pylist()}
    multimodal = any(images.image_paths(trace["prompt_messages"]) for trace in traces.values())
    formats = tuple(params.formats) + IMAGE_FORMATS if multimodal else params.formats
    ranked = pq.read_table(subsets / "ranking.parquet", columns=["id", "score", "rank"]).to_pylist()
    ranking = {row["id"]: row for row in ranked}

    ledger = StageLedger("export")
    staging = out_dir / ".subsets.tmp"  # built aside, then swapped in: no stale or half-written subsets
    shutil.rmtree(staging, ignore_errors=True)
    for name in names:
        files = export_subset(ids_of[name], traces, ranking, formats, ledger, name)
        for fmt, content in files.items():
            path = staging / name / FILE_NAMES[fmt]
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, pa.Table):
                write_parquet(path, content)
            else:
                path.write_bytes(content)
        folder = staging / name
        folder.mkdir(parents=True, exist_ok=True)
        card = dataset_card(name, ledger.extra["rows"][name], Path(outputs) if outputs is not None else None)
        (folder / "README.md").write_text(card, encoding="utf-8")
        history = "alpaca" in files and any("history" in row for row in json.loads(files["alpaca"]))
        info = dataset_info(name, formats, multimodal, history)
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir / "subsets", ignore_errors=True)
    staging.rename(out_dir / "subsets")
    return ledger.write(out_dir / "stats.json", out_dir / "quarantine.jsonl")


STAGE = Stage(export, Params, paths=[
    ("subsets", "select's subsets/ directory (ids.txt + ranking.parquet)"),
    ("segments", "segments.parquet (prompt_messages, response)"),
    ("out_dir", "where subsets/<name>/ files go"),
], optional_paths=[
    ("outputs", "the outputs/ tree whose ingest/stats.json, model/model_info.json, select/manifest.json and "
                "score and aggregate stats.json the dataset cards cite"),
])


def main(argv: list[str] | None = None):
    return STAGE.main(argv)


if __name__ == "__main__":
    main()
