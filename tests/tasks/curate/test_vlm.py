"""The vision-language scorer (tasks/curate/vlm.py) on a tiny random LLaVA: r_t against autograd with pixels present,
spans over the expanded tokens, the model stage, and refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.curate.model import Params as ModelParams
from tasks.curate.model import resolve_model
from tasks.curate.spans import SpanError, encode_traces
from tasks.curate.vlm import ImageTrace, VLMProxyModel, encode_multimodal
from tests.tasks.tiny_vlm import build_tiny_vlm_dir

RESPONSE = "The bar is 3 tall.\nIt is 1 more than 2.\nThe answer is 3."
SPANS = [(0, 18), (19, 39), (40, len(RESPONSE))]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    return build_tiny_vlm_dir(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def scorer(vlm_dir) -> VLMProxyModel:
    return VLMProxyModel(vlm_dir, "cpu")


def image_prompt(tmp_path: Path, colour: str = "red", n: int = 1) -> str:
    from PIL import Image

    parts = []
    for index in range(n):
        path = tmp_path / f"{colour}-{index}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        parts.append({"type": "image", "image": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return json.dumps([{"role": "user", "content": parts + [{"type": "text", "text": "How tall is the bar?"}]}])


def test_proxy_is_the_autograd_gradient_at_the_final_hidden_state_with_pixels(scorer, tmp_path):
    (trace,) = scorer.encode([(image_prompt(tmp_path, n=2), RESPONSE, SPANS)], chat_template=True, max_length=512)
    assert isinstance(trace, ImageTrace) and len(trace.images) == 2
    (numbers,) = scorer.launch([trace], head_variant=True).collect()

    ids = torch.from_numpy(trace.input_ids)[None]  # (1, T)
    pixels = scorer.model_inputs([trace])
    assert pixels["pixel_values"].shape[0] == 2
    model = scorer.model
    hidden = model.base_model(input_ids=ids, **pixels).last_hidden_state[0]  # (T, d) with the images in context
    leaf = hidden.detach().clone().requires_grad_(True)
    positions = np.flatnonzero(trace.loss_span >= 0)
    targets = ids[0, positions + 1]
    losses = F.cross_entropy(model.get_output_embeddings()(leaf[positions]), targets, reduction="none")  # (n,)
    proxies = []
    for k in range(trace.n_spans):
        (grad,) = torch.autograd.grad(losses[trace.loss_span[positions] == k].sum(), leaf, retain_graph=True)
        proxies.append(grad.sum(0))  # g~_k = sum_{t in k} d l_t / d h_t
    proxies = torch.stack(proxies).double()
    np.testing.assert_allclose(numbers.proxy_gram, (proxies @ proxies.T).numpy(), atol=1e-5, rtol=1e-5)
    span_losses = [losses[trace.loss_span[positions] == k].sum().item() for k in range(trace.n_spans)]
    np.testing.assert_allclose(numbers.span_loss_sums, span_losses, atol=1e-4, rtol=1e-6)
    # and the model's own forward (logits from pixels and text) gives the same token losses
    logits = model(input_ids=ids, **pixels).logits[0, positions]
    torch.testing.assert_close(F.cross_entropy(logits, targets, reduction="none"), losses.detach(), atol=1e-5, rtol=0)

    (other,) = scorer.encode([(image_prompt(tmp_path, "blue", n=2), RESPONSE, SPANS)], chat_template=True,
                             max_length=512)
    (moved,) = scorer.launch([other], head_variant=False).collect()
    assert not np.allclose(moved.proxy_gram, numbers.proxy_gram)  # the pixels are in the proxy's context


def test_spans_cover_the_response_tokens_exactly_after_image_expansion(scorer, tmp_path):
    prompt = image_prompt(tmp_path, n=2)
    (expanded,) = scorer.encode([(prompt, RESPONSE, SPANS)], chat_template=True, max_length=512)
    (plain,) = encode_traces(scorer.tokenizer, [(prompt, RESPONSE, SPANS)], chat_template=True, max_length=512)
    image_id = scorer.model.config.image_token_index
    n_image = int((expanded.input_ids == image_id).sum())
    assert n_image == 2 * 4 and int((plain.input_ids == image_id).sum()) == 2  # 4 tokens per 28x28 image
    shift = len(expanded.input_ids) - len(plain.input_ids)
    assert shift == n_image - 2
    # the same response tokens, in the same spans, only moved by the expansion
    np.testing.assert_array_equal(expanded.loss_span[shift:], plain.loss_span)
    assert (expanded.loss_span[:shift] == -1).all()
    positions = np.flatnonzero(expanded.loss_span >= 0)
    targets = expanded.input_ids[positions + 1]
    assert image_id not in targets
    # every response token is predicted exactly once, in one span, and the spans decode to the response
    assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))
    assert scorer.tokenizer.decode(targets) == RESPONSE
    for k, (start, end) in enumerate(SPANS):
        text = scorer.tokenizer.decode(expanded.input_ids[positions[expanded.loss_span[positions] == k] + 1])
        assert text.strip() == RESPONSE[start:end].strip()
    assert expanded.span_token_counts.sum() == len(positions) and (expanded.span_token_counts > 0).all()


def test_a_batch_of_image_and_text_traces_gives_each_its_own_numbers(scorer, tmp_path):
    traces = scorer.encode([(image_prompt(tmp_path, n=1), RESPONSE, SPANS),
                            (json.dumps([{"role": "user", "content": "How tall?"}]), RESPONSE, SPANS)],
                           chat_template=True, max_length=512)
    together = scorer.launch(traces, head_variant=False).collect()
    alone = [scorer.launch([trace], head_variant=False).collect()[0] for trace in traces]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.proxy_gram, b.proxy_gram, atol=1e-5, rtol=1e-4)


def test_an_image_changed_since_ingest_is_quarantined_not_scored(scorer, tmp_path):
    """extract checks each image against the sha256 ingest recorded (issue 22): a swapped file would be scored under
    the old trace key (and cached there), an unreadable one stopped the run; each is now one refused trace."""
    from PIL import Image

    prompt = image_prompt(tmp_path, "red")
    fine = (json.dumps([{"role": "user", "content": "How tall?"}]), RESPONSE, SPANS)
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "red-0.png")  # swapped for another image
    swapped, kept = encode_multimodal(scorer.processor, [(prompt, RESPONSE, SPANS), fine], max_length=512)
    assert isinstance(swapped, SpanError) and swapped.reason == "image_changed" and "red-0.png" in swapped.detail
    assert not isinstance(kept, SpanError)
    (tmp_path / "red-0.png").write_bytes(b"not an image any more")
    prompt = prompt.replace(json.loads(prompt)[0]["content"][0]["sha256"],
                            hashlib.sha256(b"not an image any more").hexdigest())
    (broken,) = encode_multimodal(scorer.processor, [(prompt, RESPONSE, SPANS)], max_length=512)
    assert isinstance(broken, SpanError) and broken.reason == "image_unreadable"
    (tmp_path / "red-0.png").unlink()
    (gone,) = encode_multimodal(scorer.processor, [(prompt, RESPONSE, SPANS)], max_length=512)
    assert isinstance(gone, SpanError) and gone.reason == "image_missing"


def test_extract_never_caches_a_changed_image_under_the_old_trace_key(vlm_dir, tmp_path):
    """A swapped image is quarantined (image_changed), that outcome is not cached: with the file restored, the same
    cache gives the trace back."""
    from PIL import Image

    from tasks.curate import extract, ingest, segment

    for name, colour in (("a", "red"), ("b", "green")):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{name}.png")
    rows = [{"id": name, "image": f"{name}.png", "question": "How tall is the bar?", "response": RESPONSE}
            for name in ("a", "b")]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    ingest.ingest(tmp_path / "pool.jsonl", tmp_path / "ingest", ingest.Params(image_root=str(tmp_path)))
    segment.segment(tmp_path / "ingest" / "traces.parquet", tmp_path / "segment", segment.Params())
    params = extract.Params(device="cpu", cache_dir=str(tmp_path / "cache"))
    original = (tmp_path / "a.png").read_bytes()
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "a.png")
    swapped = extract.extract(tmp_path / "segment" / "segments.parquet", vlm_dir, tmp_path / "x1", params)
    assert (swapped["kept"], swapped.get("quarantined_image_changed")) == (1, 1)
    (tmp_path / "a.png").write_bytes(original)
    restored = extract.extract(tmp_path / "segment" / "segments.parquet", vlm_dir, tmp_path / "x2", params)
    assert (restored["kept"], restored["quarantined"]) == (2, 0)


def test_too_long_image_trace_is_refused_not_cut(scorer, tmp_path):
    (refused,) = encode_multimodal(scorer.processor, [(image_prompt(tmp_path), RESPONSE, SPANS)], max_length=20)
    assert isinstance(refused, SpanError) and refused.reason == "response_exceeds_context"


def test_model_stage_resolves_a_local_vlm_with_its_processor(vlm_dir, tmp_path):
    info = resolve_model(tmp_path / "model", ModelParams(source=str(vlm_dir)))
    assert info["vision"] is True and info["architecture"] == "LlavaForConditionalGeneration"
    assert (tmp_path / "model" / "processor_config.json").is_file()
    loaded = VLMProxyModel(tmp_path / "model", "cpu")
    assert loaded.context_length == 512 and loaded.tokenizer.is_fast


def test_a_model_without_a_linear_lm_head_is_refused(vlm_dir, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setattr(LlavaForConditionalGeneration, "get_output_embeddings", lambda self: None)
    with pytest.raises(ValueError, match="linear LM head"):
        VLMProxyModel(vlm_dir, "cpu")
