"""The proxy math against torch.autograd on tiny models (METHOD.md 3: atol 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tasks.curate.proxy import (CAUSAL_SDPA, ProxyModel, chunked_span_sums, loss_layout, span_summaries,
                                use_mask_free_causal_attention)
from tasks.curate.spans import EncodedTrace, encode_traces

TEXT = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether."
        "\n#### 72")


def _hidden_and_targets(model, tokenizer, text=TEXT):
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # (1, T)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state  # (1, T, d)
    return ids, hidden[0, :-1], ids[0, 1:]  # (n, d), (n,): position t predicts token t+1


def _layout(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch layout of one trace whose loss slots belong to spans `labels` (n,)."""
    return {name: torch.from_numpy(array) for name, array in loss_layout([labels.numpy()]).items()}


def _contiguous_labels(n: int, cuts: list[int]) -> torch.Tensor:
    return torch.bucketize(torch.arange(n), torch.tensor(cuts), right=True)  # (n,) span of each position


def _head_logits(model, hidden, weight=None):
    return F.linear(hidden, model.get_output_embeddings().weight if weight is None else weight)


@pytest.fixture(params=["untied", "tied"])
def tiny_model(request, tiny_model_dir, tiny_sp_model_dir):
    """Both conftest models: byte-level BPE with an untied head, SentencePiece with tied embeddings."""
    from transformers import AutoTokenizer

    path = tiny_model_dir if request.param == "untied" else tiny_sp_model_dir
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings == (request.param == "tied")
    return model, AutoTokenizer.from_pretrained(path)


def test_token_proxy_is_the_autograd_gradient_of_the_token_loss(tiny_model):
    model, tokenizer = tiny_model
    _, hidden, targets = _hidden_and_targets(model, tokenizer)
    leaf = hidden.clone().requires_grad_(True)
    losses = F.cross_entropy(_head_logits(model, leaf), targets, reduction="none")  # (n,)
    (expected,) = torch.autograd.grad(losses.sum(), leaf)  # row t = d l_t / d h_t (l_t depends on h_t only)
    n = len(targets)
    weight = model.get_output_embeddings().weight.detach()
    # one span per position: the span sums are the per-token proxies r_t
    out = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(torch.arange(n)), weight)
    torch.testing.assert_close(out.proxy, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.span_loss[0], losses.double().detach(), atol=1e-5, rtol=0)


def test_span_sums_and_grams_match_autograd(tiny_model):
    model, tokenizer = tiny_model
    _, hidden, targets = _hidden_and_targets(model, tokenizer)
    n = len(targets)
    labels = _contiguous_labels(n, [5, 17, n - 4])  # 4 spans
    head = model.get_output_embeddings().weight
    leaf = hidden.clone().requires_grad_(True)
    losses = F.cross_entropy(_head_logits(model, leaf), targets, reduction="none")
    proxies, head_grads = [], []
    for k in range(4):
        span_loss = losses[labels == k].sum()
        (grad_h,) = torch.autograd.grad(span_loss, leaf, retain_graph=True)
        proxies.append(grad_h.sum(0))  # g~_k = sum_{t in k} d l_t / d h_t
        # the LM-head gradient of the span: with tied embeddings only the head's use of W, not the embedding's
        weight = head.detach().clone().requires_grad_(True)
        span_loss_w = F.cross_entropy(_head_logits(model, hidden, weight)[labels == k], targets[labels == k],
                                      reduction="sum")
        (grad_w,) = torch.autograd.grad(span_loss_w, weight)
        head_grads.append(grad_w.flatten())
    proxies, head_grads = torch.stack(proxies).double(), torch.stack(head_grads).double()
    out = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(labels), head.detach(),
                         head_dtype=torch.float32)
    torch.testing.assert_close(out.proxy.double(), proxies, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.proxy_gram[0], proxies @ proxies.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.head_gram[0], head_grads @ head_grads.T, atol=1e-4, rtol=1e-5)
    span_losses = torch.stack([losses[labels == k].sum() for k in range(4)]).double().detach()
    torch.testing.assert_close(out.span_loss[0], span_losses, atol=1e-4, rtol=1e-6)


def test_head_gram_is_the_lm_head_weight_gradient_of_a_full_backward(tiny_model_dir, bpe_tokenizer):
    """Untied head: the Gram equals that of lm_head.weight.grad from an ordinary backward of each span."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, hidden, targets = _hidden_and_targets(model, bpe_tokenizer)
    n = len(targets)
    labels = _contiguous_labels(n, [9, 30])
    grads = []
    for k in range(3):
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1]  # (n, V)
        F.cross_entropy(logits[labels == k], targets[labels == k], reduction="sum").backward()
        grads.append(model.lm_head.weight.grad.flatten().double().clone())
    grads = torch.stack(grads)
    weight = model.lm_head.weight.detach()
    out = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(labels), weight,
                         head_dtype=torch.float32)
    torch.testing.assert_close(out.head_gram[0], grads @ grads.T, atol=1e-4, rtol=1e-5)


def test_tied_head_gram_leaves_out_the_embedding_use(tiny_sp_model_dir, sentencepiece_tokenizer):
    """Tied embeddings: head_gram is the head's use of W only; a full backward also holds the embedding's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_sp_model_dir, dtype=torch.float32)
    ids, hidden, targets = _hidden_and_targets(model, sentencepiece_tokenizer)
    labels = _contiguous_labels(len(targets), [10])
    grads = []
    for k in range(2):
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1]
        F.cross_entropy(logits[labels == k], targets[labels == k], reduction="sum").backward()
        grads.append(model.get_output_embeddings().weight.grad.flatten().double().clone())
    grads = torch.stack(grads)
    out = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(labels),
                         model.get_output_embeddings().weight.detach(), head_dtype=torch.float32)
    assert not torch.allclose(out.head_gram[0], grads @ grads.T, rtol=1e-3)


def test_softcap_is_differentiated(tmp_path, bpe_tokenizer):
    """A Gemma-2 style final soft-cap: the proxy and head Gram follow the cap's derivative."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          tie_word_embeddings=False)
    model = Gemma2ForCausalLM(config).eval()
    _, hidden, targets = _hidden_and_targets(model, bpe_tokenizer)
    n = len(targets)
    labels = _contiguous_labels(n, [12])
    leaf = hidden.clone().requires_grad_(True)
    weight = model.lm_head.weight.detach().clone().requires_grad_(True)
    capped = 0.5 * torch.tanh(_head_logits(model, leaf, weight) / 0.5)
    losses = F.cross_entropy(capped, targets, reduction="none")
    proxies, head_grads = [], []
    for k in range(2):
        grad_h, grad_w = torch.autograd.grad(losses[labels == k].sum(), [leaf, weight], retain_graph=True)
        proxies.append(grad_h.sum(0))
        head_grads.append(grad_w.flatten())
    proxies, head_grads = torch.stack(proxies).double(), torch.stack(head_grads).double()
    out = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(labels), weight.detach(),
                         softcap=0.5, head_dtype=torch.float32)
    torch.testing.assert_close(out.proxy.double(), proxies, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.head_gram[0], head_grads @ head_grads.T, atol=1e-5, rtol=1e-5)
    uncapped = span_summaries(hidden, _head_logits(model, hidden), targets, _layout(labels), weight.detach())
    assert not torch.allclose(uncapped.proxy.double(), proxies, atol=1e-3)  # the cap matters at 0.5


def _save(model, tokenizer, path, identity):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "model_info.json").write_text(json.dumps({"identity": identity}))
    return path


def test_model_with_unknown_logit_transform_is_refused(tmp_path, bpe_tokenizer):
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    small = dict(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    gemma = _save(Gemma2ForCausalLM(Gemma2Config(**small, head_dim=16, final_logit_softcapping=0.5)),
                  bpe_tokenizer, tmp_path / "gemma", "gemma")
    assert ProxyModel(gemma, "cpu").softcap == 0.5  # the soft-cap is modelled, so it loads
    cohere = _save(CohereForCausalLM(CohereConfig(**small, logit_scale=0.0625)), bpe_tokenizer, tmp_path / "cohere",
                   "cohere")
    with pytest.raises(ValueError, match="logit"):
        ProxyModel(cohere, "cpu")


def line_spans(text: str) -> list[tuple[int, int]]:
    """One span per line (the last line is the answer), as the newline segmenter gives."""
    spans, start = [], 0
    for line in text.split("\n"):
        spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


def _reference(model, trace: EncodedTrace):
    """Per-trace numbers by autograd, unbatched: span loss sums, proxy Gram, LM-head Gram."""
    ids = torch.from_numpy(trace.input_ids).unsqueeze(0)
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]  # (T, d)
    positions = np.flatnonzero(trace.loss_span >= 0)
    hidden, targets = hidden[positions], ids[0, positions + 1]
    spans = torch.from_numpy(trace.loss_span[positions]).long()
    leaf = hidden.clone().requires_grad_(True)
    weight = model.get_output_embeddings().weight.detach().clone().requires_grad_(True)
    losses = F.cross_entropy(F.linear(leaf, weight), targets, reduction="none")
    loss_sums, proxies, head_grads = [], [], []
    for k in range(trace.n_spans):
        grad_h, grad_w = torch.autograd.grad(losses[spans == k].sum(), [leaf, weight], retain_graph=True)
        loss_sums.append(float(losses[spans == k].sum().detach()))
        proxies.append(grad_h.sum(0).double())
        head_grads.append(grad_w.flatten().double())
    proxies, head_grads = torch.stack(proxies), torch.stack(head_grads)
    return np.array(loss_sums), (proxies @ proxies.T).numpy(), (head_grads @ head_grads.T).numpy()


def test_batched_launch_matches_autograd_per_trace(tiny_model_dir):
    """Right padding (no attention mask: collate), length-mixed batches and loss-slot gathering change nothing."""
    proxy_model = ProxyModel(tiny_model_dir, "cpu")
    prompts = [json.dumps([{"role": "user", "content": q}]) for q in ("How many clips?", "Weng earns $12 an hour. "
                                                                      "How much did she earn in 50 minutes?", "?")]
    responses = ["She sold 24 clips.\nSo 72.\n#### 72", "12/60 = 0.2 per minute.\n0.2 x 50 = 10.\n#### 10",
                 "Unicode: café 🙂\n#### 5"]
    spans = [line_spans(response) for response in responses]
    encoded = encode_traces(proxy_model.tokenizer, list(zip(prompts, responses, spans)), chat_template=True,
                            max_length=512)
    assert all(isinstance(e, EncodedTrace) for e in encoded)
    assert len({len(e.input_ids) for e in encoded}) == 3  # padding really happens
    batched = proxy_model.launch(encoded, head_variant=True).collect()
    for trace, numbers in zip(encoded, batched):
        alone = proxy_model.launch([trace], head_variant=True).collect()[0]
        np.testing.assert_allclose(numbers.proxy_gram, alone.proxy_gram, rtol=1e-5, atol=1e-8)
        loss_sums, proxy_gram, head_gram = _reference(proxy_model.model, trace)
        np.testing.assert_allclose(numbers.span_loss_sums, loss_sums, rtol=1e-5)
        np.testing.assert_allclose(numbers.proxy_gram, proxy_gram, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(numbers.head_gram, head_gram, rtol=1e-4, atol=1e-6)
    without_head = proxy_model.launch(encoded[:1], head_variant=False).collect()[0]
    assert without_head.head_gram is None
    assert proxy_model.forward_calls == 5


def _normalised_error(gram: torch.Tensor, reference: torch.Tensor) -> float:
    """max |G - R|_ij / sqrt(R_ii R_jj): the error on the cosines the score stage takes from a Gram."""
    scale = reference.diagonal().sqrt()
    return float(((gram - reference).abs() / scale.outer(scale)).max())


@pytest.mark.parametrize("sharpness", [1.0, 30.0, 300.0])
def test_confident_tokens_keep_their_precision(sharpness):
    """Near-certain targets (1 - p[y] far below fp32 resolution) against a float64 reference; the
    GPU's bf16 head product stays within bf16 accuracy."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(60, 32), torch.randn(2000, 32) / 32 ** 0.5  # (n, d), (V, d)
    logits = sharpness * hidden @ weight.T  # (n, V)
    targets = logits.argmax(-1)
    labels = torch.arange(60) // 15
    delta = torch.softmax(logits.double(), -1)
    delta[torch.arange(60), targets] = 0
    others = delta.sum(-1)  # 1 - p[y], exact in float64
    delta[torch.arange(60), targets] = -others
    nll = torch.where(others < 0.5, -torch.log1p(-others),
                      -torch.log_softmax(logits.double(), -1)[torch.arange(60), targets])
    onehot = F.one_hot(labels).T.double()  # (k, n)
    proxies = onehot @ delta @ weight.double()  # (k, d)
    head = torch.stack([(delta[labels == k].T @ hidden.double()[labels == k]).flatten() for k in range(4)])
    exact = span_summaries(hidden, logits, targets, _layout(labels), weight, head_dtype=torch.float32)
    low = span_summaries(hidden, logits, targets, _layout(labels), weight, head_dtype=torch.bfloat16)
    assert _normalised_error(exact.proxy_gram[0], proxies @ proxies.T) < 1e-5
    assert _normalised_error(exact.head_gram[0], head @ head.T) < 1e-5
    assert _normalised_error(low.head_gram[0], head @ head.T) < 5e-3
    torch.testing.assert_close(exact.span_loss[0], onehot @ nll, rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist on CUDA only")
def test_launch_queues_a_batch_without_host_sync(tiny_model_dir):
    """Issue 6: nothing inside the batch loop waits for the GPU; only collect() does, once per batch."""
    proxy_model = ProxyModel(tiny_model_dir, "cuda")
    prompts = [json.dumps([{"role": "user", "content": q}]) for q in ("How many clips?", "How much in 50 minutes?")]
    responses = ["She sold 24 clips.\nSo 72.\n#### 72", "12/60 = 0.2 per minute.\n0.2 x 50 = 10 dollars.\n#### 10"]
    encoded = encode_traces(proxy_model.tokenizer, list(zip(prompts, responses, map(line_spans, responses))),
                            chat_template=True, max_length=512)
    expected = proxy_model.launch(encoded, head_variant=True).collect()  # warm-up: lazy CUDA set-up may sync
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        pending = proxy_model.launch(encoded, head_variant=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for ours, theirs in zip(pending.collect(), expected):
        np.testing.assert_array_equal(ours.proxy_gram, theirs.proxy_gram)


def test_launch_builds_no_attention_mask_and_changes_no_number(tiny_model_dir, monkeypatch):
    """The CUDA test's host reads, seen on a CPU: under CAUSAL_SDPA transformers builds no mask, so neither the
    packed-sequence check on position ids nor fast_all runs, and every number equals plain sdpa's."""
    from transformers import masking_utils

    proxy_model, plain = ProxyModel(tiny_model_dir, "cpu"), ProxyModel(tiny_model_dir, "cpu")
    assert proxy_model.model.config._attn_implementation == CAUSAL_SDPA
    plain.model.set_attn_implementation("sdpa")
    prompts = [json.dumps([{"role": "user", "content": q}]) for q in ("How many clips?", "How much in 50 minutes?")]
    responses = ["She sold 24 clips.\nSo 72.\n#### 72", "12/60 = 0.2 per minute.\n0.2 x 50 = 10 dollars.\n#### 10"]
    encoded = encode_traces(proxy_model.tokenizer, list(zip(prompts, responses, map(line_spans, responses))),
                            chat_template=True, max_length=512)
    expected = plain.launch(encoded, head_variant=True).collect()
    reads = []
    for name in ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa"):
        original = getattr(masking_utils, name)
        monkeypatch.setattr(masking_utils, name, lambda *a, _f=original, _n=name, **k: reads.append(_n) or _f(*a, **k))
    plain.launch(encoded, head_variant=True).collect()
    assert "find_packed_sequence_indices" in reads  # the check really runs under plain sdpa
    reads.clear()
    for ours, theirs in zip(proxy_model.launch(encoded, head_variant=True).collect(), expected):
        np.testing.assert_array_equal(ours.proxy_gram, theirs.proxy_gram)
        np.testing.assert_array_equal(ours.head_gram, theirs.head_gram)
        np.testing.assert_array_equal(ours.span_loss_sums, theirs.span_loss_sums)
    assert reads == []


def test_a_mask_that_carries_more_than_causality_keeps_transformers_masks():
    """Sliding windows (Qwen2 with use_sliding_window) and eager attention are left as they are."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, vocab_size=64)
    sliding = Qwen2ForCausalLM(Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=0,
                                           attn_implementation="sdpa"))
    assert not use_mask_free_causal_attention(sliding) and sliding.config._attn_implementation == "sdpa"
    eager = Qwen2ForCausalLM(Qwen2Config(**small, attn_implementation="eager"))
    assert not use_mask_free_causal_attention(eager) and eager.config._attn_implementation == "eager"
    full = Qwen2ForCausalLM(Qwen2Config(**small, attn_implementation="sdpa"))
    assert use_mask_free_causal_attention(full) and full.config._attn_implementation == CAUSAL_SDPA


def test_launch_under_bf16_autocast_returns_float_arrays_near_fp32(tiny_model_dir, monkeypatch):
    """CUDA's bf16 autocast, emulated by the CPU's (issue 24): what comes back is float32/64 host arrays
    (the prompt embedding's einsum once ran in bf16 under autocast, which .numpy() refuses), near fp32."""
    proxy_model = ProxyModel(tiny_model_dir, "cpu")
    prompts = [json.dumps([{"role": "user", "content": q}]) for q in ("How many clips?", "How much in 50 minutes?")]
    responses = ["She sold 24 clips.\nSo 72.\n#### 72", "12/60 = 0.2 per minute.\n0.2 x 50 = 10 dollars.\n#### 10"]
    encoded = encode_traces(proxy_model.tokenizer, list(zip(prompts, responses, map(line_spans, responses))),
                            chat_template=True, max_length=512)
    fp32 = proxy_model.launch(encoded, head_variant=True).collect()
    monkeypatch.setattr(ProxyModel, "_autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    for head_variant in (True, False):
        for ours, theirs in zip(proxy_model.launch(encoded, head_variant).collect(), fp32):
            assert ours.prompt_embedding.dtype == np.float32 and ours.proxy_gram.dtype == np.float64
            np.testing.assert_allclose(ours.span_loss_sums, theirs.span_loss_sums, rtol=2e-2)
            np.testing.assert_allclose(ours.prompt_embedding, theirs.prompt_embedding, rtol=5e-2, atol=5e-2)
            np.testing.assert_allclose(ours.proxy_gram, theirs.proxy_gram, rtol=5e-2,
                                       atol=5e-2 * np.abs(theirs.proxy_gram).max())


def test_prompt_embedding_is_the_mean_question_state_of_the_same_forward(tiny_model_dir):
    """Batched and padded, the embedding is the mean final hidden state over [question_start, prompt_tokens)."""
    proxy_model = ProxyModel(tiny_model_dir, "cpu")
    prompts = [json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}])
               for q in ("How many clips?", "Weng earns $12 an hour. How much did she earn in 50 minutes?")]
    responses = ["She sold 24 clips.\n#### 24", "12/60 = 0.2 per minute.\n0.2 x 50 = 10.\n#### 10"]
    encoded = encode_traces(proxy_model.tokenizer, [(p, r, line_spans(r)) for p, r in zip(prompts, responses)],
                            chat_template=True, max_length=512)
    batched = proxy_model.launch(encoded, head_variant=False).collect()
    for trace, numbers in zip(encoded, batched):
        assert 0 < trace.question_start < trace.prompt_tokens  # the system turn is left out
        with torch.no_grad():
            hidden = proxy_model.decoder(input_ids=torch.tensor([trace.input_ids])).last_hidden_state[0]  # (T, d)
        expected = hidden[trace.question_start:trace.prompt_tokens].mean(0).numpy()
        assert numbers.prompt_embedding.shape == expected.shape
        np.testing.assert_allclose(numbers.prompt_embedding, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched[0].prompt_embedding, batched[1].prompt_embedding)


@pytest.mark.parametrize("chunk", [1, 3, 7, 10_000])
def test_chunked_sums_match_the_whole_trace_sums(tiny_model, chunk):
    """Logits a few loss slots at a time (spans cut by chunk boundaries) give the unchunked numbers."""
    model, tokenizer = tiny_model
    _, hidden, targets = _hidden_and_targets(model, tokenizer)
    n = len(targets)
    labels = [_contiguous_labels(n, [4, 5, 17]).numpy(), _contiguous_labels(n - 6, [9]).numpy()]  # two traces
    hidden2, targets2 = torch.cat([hidden, hidden[3:n - 3]]), torch.cat([targets, targets[3:n - 3]])
    weight = model.get_output_embeddings().weight.detach()
    layout = {name: torch.from_numpy(array) for name, array in loss_layout(labels, chunk=chunk).items()}
    whole = span_summaries(hidden2, _head_logits(model, hidden2), targets2, layout, weight)
    heads = []
    span_loss, proxy = chunked_span_sums(hidden2, targets2, layout, lambda h: heads.append(len(h)) or
                                         _head_logits(model, h), weight, layout["chunk_pieces"].tolist(), chunk=chunk)
    assert max(heads) == min(chunk, len(targets2))  # never more logits than a chunk
    torch.testing.assert_close(proxy, whole.proxy, rtol=1e-5, atol=1e-6)
    flat_loss = torch.cat([whole.span_loss[0, :4], whole.span_loss[1, :2]])  # (S,) of the padded (B, k)
    torch.testing.assert_close(span_loss, flat_loss, rtol=1e-6, atol=1e-6)  # logits of other shapes: fp32 rounding
