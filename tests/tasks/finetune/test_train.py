"""Fine-tuning loop on the conftest tiny model: encoding, masking, the loss, LoRA and full training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from tasks.finetune import train
from tasks.finetune.subsets import Params

TOY = [([{"role": "user", "content": f"What is {a} plus {b}?"}], f"{a}+{b} = {a + b}\n#### {a + b}")
       for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def toy_examples(tokenizer, max_seq_len: int = 512) -> list[train.Example]:
    return [train.encode(tokenizer, messages, response, max_seq_len) for messages, response in TOY]


def test_encode_puts_the_response_after_the_templated_prompt(tokenizer):
    messages, response = TOY[0]
    example = train.encode(tokenizer, messages, response, 512)
    prompt = tokenizer.decode(example.input_ids[: example.n_prompt])
    completion = tokenizer.decode(example.input_ids[example.n_prompt:])
    assert prompt == "<|im_start|>user\nWhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "1+2 = 3\n#### 3<|im_end|>\n"  # the end of turn is learnt too: generation must stop
    assert not example.truncated


def test_encode_truncates_the_prompt_first(tokenizer):
    full = train.encode(tokenizer, *TOY[0], 512)
    n_completion = len(full.input_ids) - full.n_prompt
    short = train.encode(tokenizer, *TOY[0], n_completion + 3)
    assert short.truncated and short.n_prompt == 3 and len(short.input_ids) == n_completion + 3
    assert short.input_ids == full.input_ids[-(n_completion + 3):]  # the prompt lost its start, nothing else
    tiny = train.encode(tokenizer, *TOY[0], 5)  # the response alone is too long: one prompt token stays
    assert tiny.n_prompt == 1 and tiny.input_ids[1:] == full.input_ids[full.n_prompt: full.n_prompt + 4]


def test_collate_labels_only_response_tokens(tokenizer):
    examples = toy_examples(tokenizer)[:2] + [train.Example((5, 6, 7), 2, False)]
    batch = train.collate(examples, pad_id=tokenizer.pad_token_id, device="cpu")
    assert batch["input_ids"].shape == (3, max(len(e.input_ids) for e in examples))
    last = batch["labels"][2]
    assert last[:2].tolist() == [train.IGNORE] * 2 and last[2] == 7 and (last[3:] == train.IGNORE).all()
    assert batch["attention_mask"][2].tolist()[:4] == [1, 1, 1, 0]


def test_response_nll_equals_the_loss_of_the_full_logits(tiny_model_dir, tokenizer):
    model = train.load_model(tiny_model_dir, "cpu")
    batch = train.collate(toy_examples(tokenizer)[:3], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        per_row, counts = train.response_nll(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                            ignore_index=train.IGNORE, reduction="none")  # (B, T-1)
    torch.testing.assert_close(per_row, nll.sum(dim=1), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == (batch["labels"][:, 1:] != train.IGNORE).sum(dim=1).tolist()


def test_lr_factor_warms_up_then_decays_to_zero():
    assert train.lr_factor(0, 10, 2, "cosine") == pytest.approx(0.5)
    assert train.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert train.lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)


def test_loss_falls_below_half_on_a_memorisable_toy_set(tiny_model_dir, tokenizer):
    params = Params(mode="full", learning_rate=1e-2, epochs=30, batch_tokens=4096, warmup_ratio=0.0, device="cpu")
    model, log = train.train(train.load_model(tiny_model_dir, "cpu"), toy_examples(tokenizer), params,
                                tokenizer.pad_token_id)
    assert log["steps"] == 30 and len(log["losses"]) == 30  # 4 short examples fit one batch: one step an epoch
    assert log["loss_last"] < 0.5 * log["loss_first"]


def test_lora_on_the_last_layer_trains_only_that_layer_and_merges(tiny_model_dir, tokenizer):
    params = Params(lora_layers=1, lora_r=4, learning_rate=1e-2, epochs=3, batch_tokens=128, device="cpu")
    base = train.load_model(tiny_model_dir, "cpu")
    before = {name: value.clone() for name, value in base.state_dict().items()}
    model, log = train.train(train.load_model(tiny_model_dir, "cpu"), toy_examples(tokenizer), params,
                                tokenizer.pad_token_id)
    assert type(model) is type(base)  # adapters merged: plain weights, no peft wrapper at generation time
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)
    assert log["steps"] > 3  # batch_tokens 128 splits the four examples: several steps an epoch
    assert log["trainable_parameters"] == sum(4 * (a + b) for a, b in lora_shapes(base, layer=1))


def lora_shapes(model, layer: int) -> list[tuple[int, int]]:
    """(in, out) of every LoRA-targeted linear of one decoder layer: an r-rank adapter adds r*(in+out)."""
    targets = Params().lora_targets
    return [(module.in_features, module.out_features) for name, module in model.model.layers[layer].named_modules()
            if name.split(".")[-1] in targets]


def test_training_is_deterministic(tiny_model_dir, tokenizer):
    params = Params(lora_layers=None, learning_rate=1e-2, epochs=2, batch_tokens=128, device="cpu")
    logs = [train.train(train.load_model(tiny_model_dir, "cpu"), toy_examples(tokenizer), params,
                           tokenizer.pad_token_id)[1]["losses"] for _ in range(2)]
    assert logs[0] == logs[1]
    other = dataclasses.replace(params, seed=1)
    assert train.train(train.load_model(tiny_model_dir, "cpu"), toy_examples(tokenizer), other,
                          tokenizer.pad_token_id)[1]["losses"] != logs[0]


def test_a_fixed_number_of_steps_cycles_reshuffled_epochs():
    """finetune_eval.steps: every subset gets exactly that many optimizer steps, whatever its size."""
    examples = [train.Example(tuple(range(10 + i)), 3, False) for i in range(6)]
    params = Params(batch_tokens=32, steps=7)
    schedule = train.training_schedule(examples, params)
    assert sum(len(epoch) for epoch in schedule) == 7 and len(schedule) > 1
    assert sorted(i for batch in schedule[0] for i in batch) == list(range(6))  # whole epochs before the cut
    assert schedule[0] != schedule[1]  # each epoch its own seeded order
    assert [len(e) for e in train.training_schedule(examples, dataclasses.replace(params, steps=None, epochs=2))] \
        == [len(schedule[0])] * 2
    with pytest.raises(ValueError, match="no examples"):
        train.training_schedule([], params)


def test_precision_auto_is_bf16_on_cuda_and_on_amx_cpus_only(monkeypatch):
    assert train.resolve_precision("fp32", "cuda") == "fp32" and train.resolve_precision("bf16", "cpu") == "bf16"
    assert train.resolve_precision(None, "cuda") == "bf16" and train.resolve_precision("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert train.resolve_precision("auto", "cpu") == "bf16" and train.resolve_precision(None, "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the private probe: fp32
    assert train.resolve_precision("auto", "cpu") == "fp32"
