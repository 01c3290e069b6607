"""params.mm_charts.yaml (the multimodal chart sample) is params.yaml with only its documented keys changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.curate.score import Params as ScoreParams
from tests.params_yaml import committed_document, committed_text, defaults_are_the_section

REPO = Path(__file__).resolve().parents[1]
CHANGED = {("data", "pool"), ("data", "images"), ("data", "test"), ("data", "labels"), ("ingest", "preset"), ("ingest", "image_root"),
           ("model", "source")}


def differing_keys(name: str) -> tuple[dict, set[tuple[str, str]]]:
    """A params file beside params.yaml: its content and the (section, key) pairs whose values differ; the two
    files must hold the same sections and keys."""
    base, other = committed_document(), committed_document(name)
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


# ---- the tests read the committed params files, so they pass after `dvc exp run -S` -------------------
def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


@pytest.fixture
def clone(tmp_path) -> Path:
    """A checkout whose HEAD holds the repository's params.yaml, as a fresh clone does."""
    root = tmp_path / "clone"
    root.mkdir()
    (root / "params.yaml").write_text(committed_text(), encoding="utf-8")
    git(root, "init", "-q")
    git(root, "add", "params.yaml")
    git(root, "commit", "-qm", "params")
    return root


def test_a_users_experiment_leaves_the_defaults_check_passing(clone, tmp_path):
    document = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
    document["score"]["lambda_"] = 0.8  # what `dvc exp run -S score.lambda_=0.8` writes into the workspace
    (clone / "params.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    assert committed_document(root=clone)["score"]["lambda_"] == ScoreParams().lambda_
    assert defaults_are_the_section(ScoreParams, "score", tmp_path / "a", root=clone)


def test_a_committed_drift_still_fails_the_defaults_check(clone, tmp_path):
    document = yaml.safe_load((clone / "params.yaml").read_text(encoding="utf-8"))
    document["score"]["lambda_"] = ScoreParams().lambda_ + 0.25
    (clone / "params.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    git(clone, "commit", "-qam", "drift")  # CI's fresh clone of a drifted commit: working file = committed file
    assert not defaults_are_the_section(ScoreParams, "score", tmp_path / "a", root=clone)
    (clone / ".git").rename(clone / "git")  # no checkout (a source archive): the file itself is compared
    assert not defaults_are_the_section(ScoreParams, "score", tmp_path / "b", root=clone)
