"""Exact mode: per-span autograd Grams against hand-written backward loops and extract's head Gram."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.curate.proxy import ProxyModel
from tasks.curate.segment import Params as SegmentParams, segment_text
from tasks.curate.spans import EncodedTrace, encode_traces, trace_spans
from tasks.diagnostics.exact import ExactModel, ExactSpec, gram_float64


def encode_rows(tokenizer, rows) -> list[EncodedTrace]:
    """The conftest GSM rows as extract encodes them (chat template, newline steps, #### answer)."""
    triples = []
    for row in rows:
        steps, answer, _ = segment_text(row["answer"], "gsm8k", SegmentParams(strategy="newline"))
        prompt = json.dumps([{"role": "user", "content": row["question"]}])
        triples.append((prompt, row["answer"], trace_spans([s for s, _ in steps], [e for _, e in steps], *answer)))
    encoded = encode_traces(tokenizer, triples, chat_template=True, max_length=512)
    assert all(isinstance(e, EncodedTrace) for e in encoded), encoded
    return encoded


def hand_gram(model, params, trace: EncodedTrace) -> np.ndarray:
    """The reference: full-model logits, a standard CE per span, loss.backward(), .grad of `params`."""
    vectors = []
    for k in range(trace.n_spans):
        for p in params:
            p.grad = None
        ids = torch.as_tensor(trace.input_ids)[None]  # (1, T)
        logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V) position t predicts token t+1
        mask = torch.as_tensor(trace.loss_span[:-1] == k)
        F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").backward()
        vectors.append(torch.cat([p.grad.reshape(-1) for p in params]))
    stacked = torch.stack(vectors).double()  # (K+1, P)
    return (stacked @ stacked.T).numpy()


def fresh_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def assert_gram_close(ours, reference, rtol=1e-5):
    scale = np.abs(reference).max()
    assert scale > 0
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * scale)


def test_head_matches_hand_backward_untied(tiny_model_dir, gsm_rows):
    exact = ExactModel(tiny_model_dir, ExactSpec("head"))
    model = fresh_model(tiny_model_dir)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)
    for trace in encode_rows(exact.tokenizer, gsm_rows):
        numbers = exact.grams(trace)
        assert numbers.gram.shape == (trace.n_spans, trace.n_spans)
        assert_gram_close(numbers.gram, hand_gram(model, [head], trace))


def test_last_blocks_match_hand_backward(tiny_model_dir, gsm_rows):
    exact = ExactModel(tiny_model_dir, ExactSpec("last_blocks", last_n_blocks=1))
    model = fresh_model(tiny_model_dir)
    params = list(model.model.layers[-1].parameters()) + list(model.model.norm.parameters())
    assert exact.n_parameters == sum(p.numel() for p in params)
    for p in params:
        p.requires_grad_(True)
    trace = encode_rows(exact.tokenizer, gsm_rows)[0]
    assert_gram_close(exact.grams(trace).gram, hand_gram(model, params, trace))


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sp_model_dir"])
def test_full_matches_hand_backward_over_every_parameter(model_fixture, gsm_rows, request):
    """METHOD.md's g_k itself: every parameter, a tied matrix once with both of its uses."""
    model_dir = request.getfixturevalue(model_fixture)
    exact = ExactModel(model_dir, ExactSpec("full"))
    model = fresh_model(model_dir)
    params = list(model.parameters())
    assert exact.n_parameters == sum(p.numel() for p in params) == model.num_parameters()
    for p in params:
        p.requires_grad_(True)
    trace = encode_rows(exact.tokenizer, gsm_rows)[2]
    assert_gram_close(exact.grams(trace).gram, hand_gram(model, params, trace))


def test_lora_matches_peft_model_and_only_b_moves(tiny_model_dir, gsm_rows):
    from peft import LoraConfig, get_peft_model

    spec = ExactSpec("lora", lora_r=4, seed=3)
    exact = ExactModel(tiny_model_dir, spec)
    torch.manual_seed(spec.seed)  # the same fresh adapters, built through peft's usual wrapper
    model = get_peft_model(fresh_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=4, lora_dropout=0.0, target_modules=list(spec.lora_modules)))
    named = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    assert exact.n_parameters == sum(p.numel() for _, p in named)
    trace = encode_rows(exact.tokenizer, gsm_rows)[1]
    assert_gram_close(exact.grams(trace).gram, hand_gram(model, [p for _, p in named], trace))
    # B = 0 at init: dL/dA vanishes, dL/dB carries the whole Gram
    assert all(float(p.grad.abs().max()) == 0.0 for name, p in named if "lora_A" in name)
    assert any(float(p.grad.abs().max()) > 0.0 for name, p in named if "lora_B" in name)


def test_span_losses_match_extract(tiny_model_dir, gsm_rows):
    exact = ExactModel(tiny_model_dir, ExactSpec("last_blocks"))
    proxy = ProxyModel(tiny_model_dir, "cpu")
    traces = encode_rows(exact.tokenizer, gsm_rows)
    for trace, numbers in zip(traces, proxy.launch(traces, head_variant=False).collect()):
        np.testing.assert_allclose(exact.grams(trace).span_loss_sums, numbers.span_loss_sums, rtol=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_sp_model_dir"])
def test_extract_head_gram_equals_exact_head(model_fixture, gsm_rows, request):
    """extract's forward-only head Gram = autograd on the head's use of W (tied: the head use only)."""
    model_dir = request.getfixturevalue(model_fixture)
    exact = ExactModel(model_dir, ExactSpec("head"))
    proxy = ProxyModel(model_dir, "cpu")
    traces = encode_rows(exact.tokenizer, gsm_rows)
    for trace, numbers in zip(traces, proxy.launch(traces, head_variant=True).collect()):
        assert_gram_close(numbers.head_gram, exact.grams(trace).gram)


def test_tied_head_use_differs_from_full_parameter_gradient(tiny_sp_model_dir, gsm_rows):
    """With tied embeddings the parameter's own gradient adds the input-embedding use: not what head compares."""
    exact = ExactModel(tiny_sp_model_dir, ExactSpec("head"))
    model = fresh_model(tiny_sp_model_dir)
    tied = model.get_output_embeddings().weight
    assert tied is model.get_input_embeddings().weight
    tied.requires_grad_(True)
    trace = encode_rows(exact.tokenizer, gsm_rows)[0]
    full = hand_gram(model, [tied], trace)
    assert not np.allclose(exact.grams(trace).gram, full, rtol=1e-3)


def test_gram_float64_chunks_equal_one_product(monkeypatch):
    import tasks.diagnostics.exact

    vectors = torch.randn(3, 10)
    monkeypatch.setattr(tasks.diagnostics.exact, "GRAM_CHUNK", 4)  # 3 chunks, the last one short
    expected = (vectors.double() @ vectors.double().T).numpy()
    np.testing.assert_allclose(gram_float64(vectors), expected, rtol=1e-12)
