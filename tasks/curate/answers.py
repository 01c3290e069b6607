"""Final answers in reasoning text: the value (ingest, fine-tune evaluation) and where it sits (segment).

Four marker kinds, named as in params.yaml `ingest.answer_patterns`:
  gsm8k      "#### 72", "#### 1,234"
  answer_is  "The answer is 72", "the final answer is: 72.", MetaMathQA's "The answer is: 72"
  boxed      "\\boxed{72}", "\\boxed{\\frac{1}{2}}" (braces are matched, so nested groups stay whole)
  choice     a multiple-choice letter after "answer"/"option"/"choice" ending its line:
             "Answer: (B)", "**Answer:** C", "the correct option is D." (letters A-J)
A lone option letter in parentheses, "(B)", normalises to "B", so every kind gives the bare letter.
Every marker must carry a non-empty answer; "####" alone is no marker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

ANSWER_PATTERNS = ("gsm8k", "answer_is", "boxed", "choice")

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# "answer is" rather than "The answer is": also catches "the final answer is", "My answer is".
_ANSWER_IS = re.compile(r"\banswer[ \t]+is\b[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed[ \t]*\{")
# The letter must end its line (bar punctuation and emphasis), so "Answer: A is wrong because" is no marker.
_CHOICE = re.compile(r"\b(?:answer|option|choice)\b[^\n]*?[:\s*]\(?([A-J])\)?[ \t.*]*$", re.IGNORECASE | re.MULTILINE)
_OPTION_LETTER = re.compile(r"\(([A-J])\)")
# An "answer is" value ends at the first sentence end: "The answer is 10. So ..." -> "10" (2.5 stays whole).
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the '}' closing the '{' at open_index; escaped braces (\\{ \\}) do not count."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # skip the escaped character, e.g. \{ inside a set
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def _unwrap_once(answer: str) -> str:
    """Remove one layer of decoration around a whole answer: emphasis, math delimiters, \\boxed, '.'."""
    answer = answer.strip()
    if answer.endswith(".") and not answer.endswith(".."):
        return answer[:-1]
    for left, right in (("**", "**"), ("__", "__"), ("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            return answer[len(left):-len(right)]
    if len(answer) > 2 and answer[0] == answer[-1] == "$" and answer.count("$") == 2:
        return answer[1:-1]  # inline math "$\frac{1}{2}$"; a lone leading "$" is currency, handled below
    boxed = _BOXED.match(answer)
    if boxed and _matching_brace(answer, boxed.end() - 1) == len(answer) - 1:
        return answer[boxed.end():-1]
    return answer


def normalise_answer(answer: str) -> str:
    """Canonical answer text: undecorated, no trailing '.', no leading '$', "1,000" -> "1000"."""
    previous = None
    while previous != answer:
        previous, answer = answer, _unwrap_once(answer)
    answer = answer.removeprefix("\\$").removeprefix("$").strip()
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    letter = _OPTION_LETTER.fullmatch(answer)
    return letter.group(1) if letter else answer


def _occurrences(text: str, pattern: str) -> Iterator[tuple[int, str]]:
    """(marker start, normalised answer) for every well-formed marker of one kind, in text order."""
    if pattern == "gsm8k":
        for match in _GSM8K.finditer(text):
            yield match.start(), normalise_answer(match.group(1))
    elif pattern == "answer_is":
        for match in _ANSWER_IS.finditer(text):
            value = match.group(1)
            end = _SENTENCE_END.search(value)
            yield match.start(), normalise_answer(value[: end.start()] if end else value)
    elif pattern == "boxed":
        for match in _BOXED.finditer(text):
            close = _matching_brace(text, match.end() - 1)
            if close is not None:  # an unclosed \boxed{ (e.g. cut-off generation) carries no answer
                yield match.start(), normalise_answer(text[match.end():close])
    elif pattern == "choice":
        for match in _CHOICE.finditer(text):
            if match.group(1).isupper():  # IGNORECASE is for the keyword; "answer is a" is prose
                yield match.start(), match.group(1)
    else:
        raise ValueError(f"unknown answer pattern {pattern!r}; known: {list(ANSWER_PATTERNS)}")


def reasoning_close(text: str, tags: Sequence[str]) -> int | None:
    """Offset just after the reasoning block's closing tag (tags = (open, close), the open tag optional, as chat
    templates often put it in the prompt); None without a closing tag or with tags = ()."""
    if not tags:
        return None
    close = text.find(tags[1], max(text.find(tags[0]), 0))
    return None if close < 0 else close + len(tags[1])


def final_solution(text: str, tags: Sequence[str]) -> str:
    """The part of a response its final answer is read from: after the reasoning block (the whole text without
    one). A value inside the block ("the answer is 5? No.") is the reasoning's, not the response's answer."""
    end = reasoning_close(text, tags)
    return text if end is None else text[end:]


def extract_final_answer(text: str, patterns: Sequence[str]) -> tuple[str, str] | None:
    """(answer, source) from the LAST occurrence of the first pattern, in `patterns` order, that occurs."""
    for pattern in patterns:
        answers = [answer for _, answer in _occurrences(text, pattern) if answer]
        if answers:
            return answers[-1], pattern
    return None


def last_marker_start(text: str) -> int | None:
    """Character offset of the last final-answer marker of any kind, or None if there is none."""
    starts = [start for pattern in ANSWER_PATTERNS for start, answer in _occurrences(text, pattern) if answer]
    return max(starts) if starts else None
