"""params.mm_charts.yaml (the multimodal chart sample) is params.yaml with only its documented keys changed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHANGED = {("data", "pool"), ("data", "images"), ("data", "test"), ("data", "labels"), ("ingest", "preset"), ("ingest", "image_root"),
           ("model", "source")}


def differing_keys(name: str) -> tuple[dict, set[tuple[str, str]]]:
    """A params file beside params.yaml: its content and the (section, key) pairs whose values differ; the two
    files must hold the same sections and keys."""
    base = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    other = yaml.safe_load((REPO / name).read_text(encoding="utf-8"))
    assert base.keys() == other.keys()
    differing = set()
    for section, values in base.items():
        assert values.keys() == other[section].keys(), section
        differing |= {(section, key) for key, value in values.items() if other[section][key] != value}
    return other, differing


def test_the_multimodal_params_file_differs_from_params_yaml_only_in_its_keys():
    charts, differing = differing_keys("params.mm_charts.yaml")
    assert differing == CHANGED
    assert charts["ingest"]["image_root"] == charts["data"]["images"] == "data/mm_charts"
    pool = REPO / charts["data"]["pool"]
    first = json.loads(pool.read_text(encoding="utf-8").splitlines()[0])
    assert (REPO / charts["ingest"]["image_root"] / first["image"]).is_file()


ARITH_CHANGED = {("data", "pool"), ("data", "test"), ("data", "labels"), ("extract", "head_variant")} | {
    ("finetune_eval", key) for key in ("methods", "fractions", "lora_r", "lora_alpha", "lora_layers", "batch_tokens", "steps",
                                       "accuracy_problems", "max_new_tokens", "eval_batch_size", "trunk_cache",
                                       "repeats", "variants", "scorers")}


def test_the_testbed_params_file_differs_from_params_yaml_only_in_its_keys():
    testbed, differing = differing_keys("params.arith_chains.yaml")
    assert differing == ARITH_CHANGED
    for key in ("pool", "test", "labels"):
        assert (REPO / testbed["data"][key]).is_file()
    # the profile that learns content: adapters on every layer, a fixed number of steps, every test problem
    finetune = testbed["finetune_eval"]
    assert finetune["lora_layers"] is None and finetune["steps"] >= 1 and finetune["accuracy_problems"] is None
    assert finetune["calibration"] and finetune["repeats"] == 3 and len(finetune["random_seeds"]) == 3
