"""warmup: LoRA on a seeded random slice of the pool, merged into a model directory extract can load."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.curate import extract

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate.model import model_identity
from tasks.curate.proxy import ProxyModel
from tasks.finetune import train
from tasks.finetune.warmup import Params, main, warmup, warmup_ids
from tests.conftest import GSM_ROWS
from tests.tasks.finetune.test_subsets import MORE_ROWS
from tests.tasks.tiny_pipeline import build_segments


def test_warmup_ids_are_a_seeded_share_independent_of_order():
    ids = [f"t{i:03d}" for i in range(100)]
    first = warmup_ids(ids, 0.05, 0)
    assert len(first) == 5 and first == sorted(first)
    assert warmup_ids(list(reversed(ids)), 0.05, 0) == first
    assert warmup_ids(ids, 0.05, 1) != first
    assert len(warmup_ids(ids[:3], 0.05, 0)) == 1  # at least one trace


def _nll(model_dir, rows) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = train.load_model(model_dir, "cpu")
    examples = [train.encode(tokenizer, json.loads(r["prompt_messages"]), r["response"], 512) for r in rows]
    batch = train.collate(examples, train.padding_id(tokenizer), "cpu")
    with torch.no_grad():
        nll, counts = train.response_nll(model, batch)
    return float(nll.sum() / counts.sum())


def test_warmed_model_learned_its_slice_and_extract_loads_it(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS] + MORE_ROWS)
    params = Params(fraction=0.5, epochs=4, learning_rate=1.0e-2, device="cpu")
    stats = warmup(segments, tiny_model_dir, tmp_path / "warmup", params)
    model_dir = tmp_path / "warmup" / "model"
    chosen = (tmp_path / "warmup" / "ids.txt").read_text(encoding="utf-8").split()
    rows = [r for r in pq.read_table(segments).to_pylist() if r["id"] in chosen]
    assert stats["n_warmup"] == len(chosen) == len(rows) > 0
    assert stats["read"] == stats["kept"] == pq.read_metadata(segments).num_rows
    info = json.loads((model_dir / "model_info.json").read_text(encoding="utf-8"))
    base_identity = json.loads((tiny_model_dir / "model_info.json").read_text(encoding="utf-8"))["identity"]
    assert info["identity"] == model_identity(model_dir) != info["warmed_from"] == base_identity
    assert _nll(model_dir, rows) < _nll(tiny_model_dir, rows)  # it learned what it was shown
    assert (model_dir / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert not any(p.name.startswith("adapter") for p in model_dir.iterdir())  # merged, a plain model
    ProxyModel(model_dir, "cpu")  # extract's loader accepts it (its logits probe included)
    out = extract.extract(segments, model_dir, tmp_path / "extract", extract.Params(cache_dir=None))
    assert out["kept"] == stats["read"]


def test_bad_params_name_the_setting():
    for values, setting in (({"fraction": 0}, "warmup.fraction"), ({"fraction": 1.5}, "warmup.fraction"),
                            ({"learning_rate": "1e-3"}, "warmup.learning_rate"), ({"mode": "qlora"}, "warmup.mode"),
                            ({"lora_layers": 0}, "warmup.lora_layers"), ({"lora_targets": []}, "warmup.lora_targets"),
                            ({"lora_targets": [""]}, "warmup.lora_targets")):
        with pytest.raises(ParamsError, match=setting):
            params_from_dict(Params, "warmup", values)


def test_cli_runs_the_stage(tmp_path, tiny_model_dir):
    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS])
    params_file = tmp_path / "params.yaml"
    params_file.write_text("warmup:\n  fraction: 0.5\n  device: cpu\n", encoding="utf-8")
    stats = main(["--params", str(params_file), "--segments", str(segments), "--model", str(tiny_model_dir),
                  "--out-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "model" / "model_info.json").is_file() and stats["n_warmup"] >= 1


def test_lora_targets_the_model_lacks_stop_the_stage_with_one_line(tmp_path, tiny_model_dir, capsys):
    """A module name no layer of the model has fails at the start of training, naming the setting and the layers."""
    segments = build_segments(tmp_path, [dict(row) for row in GSM_ROWS])
    params_file = tmp_path / "params.yaml"
    params_file.write_text("warmup:\n  fraction: 0.5\n  device: cpu\n  lora_targets: [q_proj, qkv_proj]\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--params", str(params_file), "--segments", str(segments), "--model", str(tiny_model_dir),
              "--out-dir", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    [error] = [line for line in stderr.splitlines() if "error:" in line]  # transformers' load bar aside
    assert stopped.value.code == 2 and "Traceback" not in stderr
    assert "warmup.lora_targets: ['qkv_proj'] name no layer of the model; its layers are [" in error
    assert "'q_proj'" in error and not (tmp_path / "out" / "model").exists()
