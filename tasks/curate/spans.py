r"""Token spans (METHOD.md 4): render a trace as model input and say which span each loss belongs to.

A trace is the prompt (context only) and the scored response, whose steps and answer are character
spans. Rules, in order:
  - Input text: the tokenizer's chat template over prompt_messages + an assistant turn holding the
    scored response (when asked for and the tokenizer has one), else the prompt turns' contents
    joined by "\n", then "\n", then the response. The response is located in the rendered text by
    its last occurrence, so a template that rewrites the response is refused (response_not_in_template).
  - Each token is placed by one character, its anchor: its first non-whitespace character, or for a
    whitespace-only token its last character (for a zero-width token, its offset). So a token
    straddling a span boundary (".\n") goes with its first visible character, and a whitespace-only
    token between spans ("\n") goes with the span that follows it.
  - Tokens anchored in the response belong to the span holding the anchor; anchors in a gap between
    spans (or before the first) belong to the next span, anchors after the answer to the answer.
    Every response token thus lands in exactly one step or answer span. Tokens anchored in the
    prompt are context.
  - Position t predicts token t+1, so the loss at position t belongs to the span of token t+1: the
    token that predicts the first token of a span belongs to that span.
  - Template tokens after the response (e.g. <|im_end|>) are context with no loss; in a causal model
    they cannot change any earlier position, so they are not fed at all.
  - Longer than max_length: prompt tokens are cut from the left (the template's start included), keeping
    the position that predicts the first response token; a trace whose response itself does not fit
    is refused (response_exceeds_context). A span left with no token is refused (empty_span_tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# Every code point Python's str.isspace() accepts lies at or below U+3000 (ideographic space).
_LAST_SPACE = 0x3000
_IS_SPACE = np.array([chr(c).isspace() for c in range(_LAST_SPACE + 2)])  # index _LAST_SPACE + 1: "above", False


@dataclass(frozen=True, slots=True)
class EncodedTrace:
    """One trace as model input: tokens and, per position, the span its next-token loss belongs to."""

    input_ids: np.ndarray  # (T,) int64 tokens fed to the model, after truncation
    loss_span: np.ndarray  # (T,) int32: span of the loss at position t (target = token t+1); -1 = no loss
    n_spans: int  # K steps + 1 answer
    prompt_tokens: int  # tokens before the first response token that were kept
    prompt_tokens_truncated: int  # tokens cut from the left to fit max_length
    question_start: int = 0  # first kept position of the last prompt turn's content (its question)

    @property
    def span_token_counts(self) -> np.ndarray:
        return np.bincount(self.loss_span[self.loss_span >= 0], minlength=self.n_spans).astype(np.int32)


@dataclass(frozen=True, slots=True)
class SpanError:
    """Why a trace cannot be encoded: a quarantine reason and a sentence for humans."""

    reason: str
    detail: str


def trace_spans(step_starts, step_ends, answer_start: int, answer_end: int) -> list[tuple[int, int]]:
    """The spans of one segments row in extract order: steps 1..K, then the answer."""
    return [*zip(step_starts, step_ends), (answer_start, answer_end)]


def uses_chat_template(tokenizer, chat_template: bool) -> bool:
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def question_offset(prompt_messages: str, text: str, response_start: int) -> int:
    """Character offset in `text` of the last prompt turn's content (the question), 0 if not found.

    The template's own tokens and a system prompt are the same for every trace; the question is
    what tells problems apart, so the prompt embedding (extract) averages from here on.
    """
    messages = json.loads(prompt_messages)
    content = messages[-1].get("content") if messages else None
    if not isinstance(content, str) or not content:
        return 0
    return max(text.rfind(content, 0, max(response_start, 0)), 0)


def render(tokenizer, prompt_messages: str, response: str, use_template: bool) -> tuple[str, int]:
    """(full text, character offset of the response in it; -1 if a template rewrote the response)."""
    messages = json.loads(prompt_messages)
    if use_template:
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        return text, text.rfind(response)
    prompt = "\n".join(message["content"] for message in messages)
    return f"{prompt}\n{response}", len(prompt) + 1


def _check_spans(spans: list[tuple[int, int]], length: int) -> str | None:
    previous_end = 0
    for index, (start, end) in enumerate(spans):
        if not (previous_end <= start < end <= length):
            return (f"span {index} ({start}, {end}) is empty, overlaps the previous one or leaves the response "
                    f"({length} chars)")
        previous_end = end
    return None


def token_spans(text: str, offsets: np.ndarray, response: tuple[int, int], spans: list[tuple[int, int]]) -> np.ndarray:
    """(n,) int32 span index of each token by the anchor rule (module docstring); -1 = context.

    `offsets` (n, 2) are the tokenizer's character offsets into `text`, `response` the response's
    (start, end) in `text`, `spans` the step and answer spans relative to the response.
    """
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)  # (L,) one per str index
    positions = np.where(_IS_SPACE[np.minimum(codes, _LAST_SPACE + 1)], len(text), np.arange(len(text)))
    # next_visible[i] = index of the first non-whitespace char at or after i; len(text) if none
    next_visible = np.append(np.minimum.accumulate(positions[::-1])[::-1], len(text))  # (L+1,)
    starts, ends = offsets[:, 0], offsets[:, 1]  # (n,)
    first_visible = next_visible[np.minimum(starts, len(text))]
    anchor = np.where(first_visible < ends, first_visible, np.maximum(ends - 1, starts))  # (n,)
    span_starts = np.array([start for start, _ in spans]) + response[0]  # (K+1,)
    span_ends = np.array([end for _, end in spans]) + response[0]
    last = np.searchsorted(span_starts, anchor, side="right") - 1  # last span starting at or before the anchor
    inside = (last >= 0) & (anchor < span_ends[np.maximum(last, 0)])
    label = np.where(inside, last, np.minimum(last + 1, len(spans) - 1))
    in_response = (anchor >= response[0]) & (anchor < response[1])
    return np.where(in_response, label, -1).astype(np.int32)


def encode_traces(tokenizer, traces: list[tuple[str, str, list[tuple[int, int]]]], *, chat_template: bool,
                  max_length: int) -> list[EncodedTrace | SpanError]:
    """Encode (prompt_messages JSON, scored_response, spans) triples; one tokenizer call for all."""
    use_template = uses_chat_template(tokenizer, chat_template)
    rendered = [render(tokenizer, prompt, response, use_template) for prompt, response, _ in traces]
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
    encodings = tokenizer([text for text, _ in rendered], return_offsets_mapping=True,
                          add_special_tokens=not use_template, verbose=False).encodings
    results: list[EncodedTrace | SpanError] = []
    for (text, response_start), encoding, (prompt, response, spans) in zip(rendered, encodings, traces):
        problem = _check_spans(spans, len(response))
        if response_start < 0:
            results.append(SpanError("response_not_in_template", "the chat template does not reproduce the "
                                     "scored response verbatim; set extract.chat_template: false"))
        elif problem:
            results.append(SpanError("invalid_spans", problem))
        else:
            offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)  # (n, 2)
            labels = token_spans(text, offsets, (response_start, response_start + len(response)), spans)
            question_token = int(np.searchsorted(offsets[:, 1], question_offset(prompt, text, response_start),
                                                 side="right"))  # first token ending past the question's start
            results.append(_fit(np.array(encoding.ids, dtype=np.int64), labels, len(spans), max_length,
                                question_token))
    return results


def _fit(ids: np.ndarray, labels: np.ndarray, n_spans: int, max_length: int,
         question_token: int = 0) -> EncodedTrace | SpanError:
    """Drop what follows the response, cut the prompt from the left to max_length, shift labels to positions."""
    response_tokens = np.flatnonzero(labels >= 0)
    if len(response_tokens) == 0:
        return SpanError("empty_span_tokens", "the response has no tokens")
    if (np.diff(labels[response_tokens]) < 0).any():  # the span sums need each span as one run of positions
        return SpanError("unordered_token_offsets", "the tokenizer's offsets put response tokens out of span order")
    first, last = int(response_tokens[0]), int(response_tokens[-1])
    needed = last + 1 - max(first - 1, 0)  # the response and the position that predicts its first token
    if needed > max_length:
        return SpanError("response_exceeds_context",
                         f"the response needs {needed} positions but max_length is {max_length}")
    cut = max(0, last + 1 - max_length)
    loss_span = np.append(labels[cut + 1:last + 1], -1).astype(np.int32)  # position t: label of token t+1
    # the question's positions that survive the cut, at least the last prompt position
    question_start = min(max(question_token - cut, 0), max(first - cut - 1, 0))
    encoded = EncodedTrace(ids[cut:last + 1], loss_span, n_spans, first - cut, cut, question_start)
    counts = encoded.span_token_counts
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0).tolist()
        return SpanError("empty_span_tokens", f"span(s) {empty} of {n_spans} received no token")
    return encoded
