"""Token <-> span mapping (METHOD.md 4) on byte-level BPE and SentencePiece-style tokenizers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tasks.curate.spans import EncodedTrace, SpanError, encode_traces, render, token_spans

PROMPT = json.dumps([{"role": "user", "content": "Léa buys 4 croissants at €2.50. How much?"}])

TRICKY = {
    "gsm": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    "unicode": "Un café coûte €2.50 à Tōkyō 東京.\nΔx ≈ 0.1 and naïve ﬁ ligature\u00a0here.\n#### 10",
    "emoji": "She is happy 🙂🙂 and 👩‍👩‍👧 family 🇫🇷!\nThen 3 × 4 = 12 🎉\n#### 12",
    "latex": "So she pays $\\frac{20}{2}$ = 10.\n\\sum_{i=1}^n i = \\frac{n(n+1)}{2}\nThe answer is \\boxed{10}.",
    "code": "def f(x):\n    return x ** 2  # square\n\tprint(f(3))\r\n  \nThe answer is 9",
    "spaces": "  Leading spaces.\n\u3000Ideographic space line.\n\n\nMany blank lines.\n#### 7  ",
}


def visible_line_spans(text: str) -> list[tuple[int, int]]:
    """Lines trimmed of whitespace, empty ones dropped; the last one is the answer (as segment does)."""
    spans, start = [], 0
    for line in text.split("\n"):
        left = len(line) - len(line.lstrip())
        if line.strip():
            spans.append((start + left, start + len(line.rstrip())))
        start += len(line) + 1
    return spans


def encode_one(tokenizer, response, spans=None, *, prompt=PROMPT, chat_template=True, max_length=512):
    spans = visible_line_spans(response) if spans is None else spans
    return encode_traces(tokenizer, [(prompt, response, spans)], chat_template=chat_template,
                         max_length=max_length)[0]


def token_view(tokenizer, response, chat_template=True):
    """(text, offsets, token labels, response (start, end)) of the full rendered trace."""
    use_template = chat_template and tokenizer.chat_template is not None
    text, start = render(tokenizer, PROMPT, response, use_template)
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not use_template)
    offsets = np.array(encoding["offset_mapping"]).reshape(-1, 2)
    labels = token_spans(text, offsets, (start, start + len(response)), visible_line_spans(response))
    return text, offsets, labels, (start, start + len(response)), encoding["input_ids"]


@pytest.fixture(params=["bpe", "sentencepiece"])
def tokenizer(request, bpe_tokenizer, sentencepiece_tokenizer):
    return bpe_tokenizer if request.param == "bpe" else sentencepiece_tokenizer


@pytest.mark.parametrize("chat_template", [True, False])
@pytest.mark.parametrize("name", sorted(TRICKY))
def test_every_response_token_lands_in_exactly_one_span(tokenizer, name, chat_template):
    response = TRICKY[name]
    spans = visible_line_spans(response)
    text, offsets, labels, (start, end), ids = token_view(tokenizer, response, chat_template)
    for (a, b), label in zip(offsets, labels):
        visible_in_response = any(not text[c].isspace() for c in range(max(a, start), min(b, end)))
        touches_response = a < end and b > start
        if visible_in_response:
            assert label >= 0, (text[a:b], label)
        if not touches_response:
            assert label == -1, (text[a:b], label)
        for k, (s, e) in enumerate(spans):  # a token wholly inside a span belongs to it
            if start + s <= a < b <= start + e:
                assert label == k, (text[a:b], label, k)
    response_labels = labels[labels >= 0]
    assert (np.diff(response_labels) >= 0).all()  # spans follow each other in order
    assert set(response_labels.tolist()) == set(range(len(spans)))

    encoded = encode_one(tokenizer, response, chat_template=chat_template)
    assert isinstance(encoded, EncodedTrace)
    first = int(np.flatnonzero(labels >= 0)[0])
    last = int(np.flatnonzero(labels >= 0)[-1])
    assert encoded.input_ids.tolist() == ids[:last + 1]  # what follows the response is not fed
    np.testing.assert_array_equal(encoded.loss_span[:-1], labels[1:last + 1])  # position t -> token t+1
    assert encoded.loss_span[-1] == -1
    assert encoded.prompt_tokens == first
    assert encoded.span_token_counts.sum() == (labels >= 0).sum()


def test_whitespace_token_between_spans_joins_the_next_span(bpe_tokenizer):
    response = "She sold 24 clips.\nSo 72.\n#### 72"
    text, offsets, labels, (start, end), _ = token_view(bpe_tokenizer, response)
    newlines = [label for (a, b), label in zip(offsets, labels) if text[a:b] == "\n" and start <= a < end]
    assert newlines == [1, 2]


def test_straddling_token_goes_with_its_first_visible_character(sentencepiece_tokenizer):
    response = "So she pays 10 euros.\n#### 10"
    text, offsets, labels, (start, _), _ = token_view(sentencepiece_tokenizer, response)
    straddling = [label for (a, b), label in zip(offsets, labels) if text[a:b] == ".\n" and a >= start]
    assert straddling == [0]  # ".\n": "." ends step 0, the newline precedes the answer


def test_first_loss_is_predicted_by_the_last_prompt_token(bpe_tokenizer):
    encoded = encode_one(bpe_tokenizer, "She sold 24 clips.\n#### 72")
    losses = np.flatnonzero(encoded.loss_span >= 0)
    assert losses[0] == encoded.prompt_tokens - 1 and encoded.loss_span[losses[0]] == 0
    assert bpe_tokenizer.decode(encoded.input_ids[:encoded.prompt_tokens]).endswith("<|im_start|>assistant\n")


def test_plain_concatenation_without_a_template(bpe_tokenizer):
    assert render(bpe_tokenizer, PROMPT, "Four.", False) == (f"{json.loads(PROMPT)[0]['content']}\nFour.",
                                                             len(json.loads(PROMPT)[0]["content"]) + 1)
    untemplated = copy.deepcopy(bpe_tokenizer)
    untemplated.chat_template = None
    plain = encode_one(untemplated, "She sold 24 clips.\n#### 72", chat_template=True)
    assert "<|im_start|>" not in untemplated.decode(plain.input_ids)
    assert plain.input_ids.tolist() == encode_one(bpe_tokenizer, "She sold 24 clips.\n#### 72",
                                                  chat_template=False).input_ids.tolist()


def test_template_that_rewrites_the_response_is_refused(bpe_tokenizer):
    shouting = copy.deepcopy(bpe_tokenizer)
    shouting.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    result = encode_one(shouting, "She sold 24 clips.\n#### 72")
    assert isinstance(result, SpanError) and result.reason == "response_not_in_template"


def test_long_traces_lose_prompt_tokens_from_the_left(tokenizer):
    response = TRICKY["gsm"]
    full = encode_one(tokenizer, response)
    length = len(full.input_ids)
    cut = encode_one(tokenizer, response, max_length=length - 5)
    assert (cut.prompt_tokens_truncated, cut.prompt_tokens) == (5, full.prompt_tokens - 5)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[5:])
    np.testing.assert_array_equal(cut.loss_span, full.loss_span[5:])
    np.testing.assert_array_equal(cut.span_token_counts, full.span_token_counts)
    # the tightest fit keeps exactly one prompt token: the one that predicts the first response token
    needed = length - full.prompt_tokens + 1
    tight = encode_one(tokenizer, response, max_length=needed)
    assert tight.prompt_tokens == 1 and tight.span_token_counts.tolist() == full.span_token_counts.tolist()
    refused = encode_one(tokenizer, response, max_length=needed - 1)
    assert isinstance(refused, SpanError) and refused.reason == "response_exceeds_context"


def test_spans_without_tokens_or_out_of_order_are_refused(bpe_tokenizer):
    merged = encode_one(bpe_tokenizer, "10", spans=[(0, 1), (1, 2)])  # "10" is one token: span 1 gets nothing
    assert isinstance(merged, SpanError) and merged.reason == "empty_span_tokens"
    for spans in ([(0, 5), (3, 9)], [(0, 5), (6, 99)], [(2, 2), (3, 9)]):
        result = encode_one(bpe_tokenizer, "She sold 24 clips.", spans=spans)
        assert isinstance(result, SpanError) and result.reason == "invalid_spans", spans


@pytest.mark.parametrize("chat_template", [True, False])
def test_question_start_is_the_first_token_of_the_last_prompt_turn(tokenizer, chat_template):
    """The prompt embedding averages from the question on: template and system tokens are the same for every trace."""
    response = "Step one.\n#### 3"
    encoded = encode_one(tokenizer, response, chat_template=chat_template)
    use_template = chat_template and tokenizer.chat_template is not None
    text, _ = render(tokenizer, PROMPT, response, use_template)
    offsets = np.array(tokenizer(text, return_offsets_mapping=True, add_special_tokens=not use_template)
                       ["offset_mapping"]).reshape(-1, 2)
    question_at = text.index(json.loads(PROMPT)[-1]["content"])
    assert use_template == (question_at > 0)  # the template puts tokens before the question
    assert 0 <= encoded.question_start < encoded.prompt_tokens
    assert offsets[encoded.question_start, 1] > question_at  # the question's first token is in
    assert (offsets[:encoded.question_start, 1] <= question_at).all()  # everything before it is out
