"""Frozen-trunk cache: running only the top layers on cached trunk outputs changes no number."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from tasks.finetune import evaluate, train, trunk
from tasks.finetune.subsets import Params

TOY = [([{"role": "user", "content": f"What is {a} plus {b}?"}], f"{a}+{b} = {a + b}\n#### {a + b}")
       for a, b in [(1, 2), (3, 4), (15, 6), (7, 28), (9, 9)]]
# fp32: the split forward is exact there; bf16 (precision auto on an AMX CPU) rounds by the batch's shape
PARAMS = Params(lora_layers=1, lora_r=4, learning_rate=1e-2, epochs=2, batch_tokens=128, device="cpu",
                precision="fp32")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[train.Example]:
    return [train.encode(tokenizer, messages, response, 512) for messages, response in TOY]


def test_trunk_exists_only_below_lora_adapters(tiny_model_dir):
    model = train.load_model(tiny_model_dir, "cpu")  # two layers
    assert train.trunk_end(model, PARAMS) == 1
    for other in (dataclasses.replace(PARAMS, mode="full"), dataclasses.replace(PARAMS, lora_layers=None),
                  dataclasses.replace(PARAMS, lora_layers=2)):
        assert train.trunk_end(model, other) is None


def test_training_on_trunk_states_matches_training_on_tokens(tiny_model_dir, tokenizer, examples):
    base = train.load_model(tiny_model_dir, "cpu")
    cache = trunk.prepare(base, {str(i): e for i, e in enumerate(examples)}, examples[:2], PARAMS,
                          tokenizer.pad_token_id)
    assert cache is not None and cache.end == 1 and cache.pool["0"].shape == (len(examples[0].input_ids), 32)
    plain, plain_log = train.train(train.load_model(tiny_model_dir, "cpu"), examples, PARAMS,
                                      tokenizer.pad_token_id)
    states = [cache.pool[str(i)] for i in range(len(examples))]
    cut, cut_log = train.train(train.load_model(tiny_model_dir, "cpu"), examples, PARAMS,
                                  tokenizer.pad_token_id, states=states)
    assert len(cut.model.layers) == 2  # the full decoder is back after training
    assert cut_log["losses"] == pytest.approx(plain_log["losses"], abs=1e-4)
    for name, weight in plain.state_dict().items():
        torch.testing.assert_close(cut.state_dict()[name], weight, atol=1e-5, rtol=1e-4)
    with_trunk = evaluate.gold_nll(cut, examples[:2], tokenizer.pad_token_id, 128, (cache.end, cache.test))
    without = evaluate.gold_nll(cut, examples[:2], tokenizer.pad_token_id, 128)
    assert with_trunk[1] == without[1] and with_trunk[0] == pytest.approx(without[0], abs=1e-4)


def test_under_bf16_the_trunk_states_are_the_bf16_trunk_training_would_run(tiny_model_dir, tokenizer, examples):
    bf16 = dataclasses.replace(PARAMS, precision="bf16")
    base = train.load_model(tiny_model_dir, "cpu")
    cache = trunk.prepare(base, {str(i): e for i, e in enumerate(examples)}, examples[:2], bf16, tokenizer.pad_token_id)
    assert cache is not None  # the split check holds at bf16's own tolerance
    fp32_states = trunk.trunk_states(base, examples, 1, 128)
    bf16_states = trunk.trunk_states(base, examples, 1, 128, "bf16")
    assert not all(torch.equal(a, b) for a, b in zip(fp32_states, bf16_states))  # bf16 really ran
    assert all(torch.equal(cache.pool[str(i)], bf16_states[i]) for i in range(len(examples)))
    assert all(torch.equal(cache.test[i], fp32_states[i]) for i in range(2))  # evaluation on a CPU is fp32
    _, plain_log = train.train(train.load_model(tiny_model_dir, "cpu"), examples, bf16, tokenizer.pad_token_id)
    _, cut_log = train.train(train.load_model(tiny_model_dir, "cpu"), examples, bf16, tokenizer.pad_token_id,
                             states=[cache.pool[str(i)] for i in range(len(examples))])
    assert cut_log["losses"] == pytest.approx(plain_log["losses"], abs=2e-2)


def test_split_forward_check_catches_states_that_are_not_the_trunk(tiny_model_dir, tokenizer, examples):
    model = train.load_model(tiny_model_dir, "cpu")
    right = trunk.trunk_states(model, examples, 1, 256)
    assert trunk.split_matches(model, examples, right, 1, tokenizer.pad_token_id)
    embeddings_only = trunk.trunk_states(model, examples, 0, 256)  # one layer short
    assert not trunk.split_matches(model, examples, embeddings_only, 1, tokenizer.pad_token_id)


def test_decoder_layers_restores_the_model_even_on_error(tiny_model_dir):
    model = train.load_model(tiny_model_dir, "cpu")
    layers, norm = model.model.layers, model.model.norm
    with pytest.raises(RuntimeError, match="boom"):
        with train.decoder_layers(model, 1, final_norm=False):
            assert len(model.model.layers) == 1 and isinstance(model.model.norm, torch.nn.Identity)
            raise RuntimeError("boom")
    assert model.model.layers is layers and model.model.norm is norm
