"""A pipeline workspace on tiny data, and what two runs of the pipeline must agree on, file by file.

`write_workspace` lays out a directory like the repository (params.yaml, data/gsm_noisy/pool.jsonl
and data/no_images, params.yaml's data.images for a text pool) with eight GSM rows, four of them bad in some way, and params for the tiny test model.

`assert_same_artifacts` compares two outputs/ trees: every artifact as bytes, except what records
the run rather than the data: the run counters (wall time, throughput, cache hits) in stats.json,
metrics.json and where report.html shows them, the great-expectations Data Docs (each page is stamped with its run
time, and so is its path) and the .gitignore files DVC writes next to its outputs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from tests.conftest import GSM_ROWS
from tests.params_yaml import committed_document

REPO = Path(__file__).resolve().parents[2]
# Run counters: wall times (*seconds), throughputs (*_per_s) and what the extraction cache served.
RUN_COUNTER = re.compile(r"\w*seconds|\w*_per_s|traces_computed|traces_cached|shards_skipped|workers")
REPORT_COUNTER = re.compile(rb"\b(" + RUN_COUNTER.pattern.encode() + rb")=[^;<]*")  # report.html: "seconds=0.8"
DATA_DOCS = "validate/data_docs/"

POOL_LINES = [json.dumps(row, ensure_ascii=False) for row in GSM_ROWS] + [
    json.dumps({"id": "gsm-d", "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                "answer": "He starts with 3 apples.\nThen 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}),
    # ingest: no_assistant_turn (a response without an answer marker is kept now: segment's answer_fallback)
    json.dumps({"id": "gsm-no-answer", "messages": [{"role": "user", "content": "How many legs do 2 cats have?"}]}),
    '{"id": "gsm-broken", "question": "Half a record',  # ingest: malformed_json
    json.dumps({"id": "gsm-no-steps", "question": "What is 2 + 3?", "answer": "#### 5"}),  # segment: no_steps
    json.dumps(GSM_ROWS[0]),  # ingest: duplicate_id
]


def write_workspace(root: Path, model_dir: Path, **extract_overrides) -> Path:
    """root/params.yaml (the repository's, on the tiny model), root/data/gsm_noisy/pool.jsonl, data/no_images and
    data/no_labels.jsonl."""
    params = committed_document()
    params["model"]["source"] = str(model_dir)
    # Two shards of two traces; no cache, so every run computes what it writes.
    params["extract"].update(device="cpu", shard_size=2, cache_dir=None, **extract_overrides)
    params["select"].update(fractions=[0.5, 1.0], token_budget=100000)
    params["data"]["labels"] = "data/no_labels.jsonl"  # an unlabelled pool: no calibration rows (tests of their own)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    pool = root / "data" / "gsm_noisy" / "pool.jsonl"
    pool.parent.mkdir(parents=True)
    pool.write_text("\n".join(POOL_LINES) + "\n", encoding="utf-8")
    shutil.copytree(REPO / "data" / "no_images", root / "data" / "no_images")  # dvc.yaml's ingest dep data.images
    shutil.copy(REPO / "data" / "no_labels.jsonl", root / "data" / "no_labels.jsonl")  # finetune/dvc.yaml's dep
    return root


def artifact_tree(outputs: Path) -> dict[str, bytes | dict]:
    """relative path -> file bytes, or for stats.json and metrics.json their content, less the run counters."""
    tree: dict[str, bytes | dict] = {}
    for path in sorted(p for p in Path(outputs).rglob("*") if p.is_file()):
        relative = path.relative_to(outputs).as_posix()
        if relative.startswith(DATA_DOCS) or path.name == ".gitignore":
            continue
        if path.name in ("stats.json", "metrics.json"):
            stats = json.loads(path.read_text(encoding="utf-8"))
            tree[relative] = {key: value for key, value in stats.items() if not RUN_COUNTER.fullmatch(key)}
        elif relative == "report/report.html":
            tree[relative] = REPORT_COUNTER.sub(rb"\1=*", path.read_bytes())
        else:
            tree[relative] = path.read_bytes()
    return tree


def assert_same_artifacts(expected: Path, actual: Path) -> int:
    """Fail naming every file that is missing, extra or different; returns how many files matched."""
    want, got = artifact_tree(expected), artifact_tree(actual)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    different = sorted(name for name in set(want) & set(got) if want[name] != got[name])
    assert not (missing or extra or different), (
        f"{actual} differs from {expected}: missing {missing}, extra {extra}, different {different}")
    assert (Path(actual) / DATA_DOCS / "index.html").is_file() == (Path(expected) / DATA_DOCS / "index.html").is_file()
    return len(want)
