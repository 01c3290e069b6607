"""Held-out evaluation of a model: final-answer accuracy and the loss of the gold solutions.

accuracy     greedy generation (batched, left-padded) from the chat-templated question; the final
             answer is read as ingest reads it (tasks.curate.answers.extract_final_answer with
             ingest.answer_patterns) and must equal the gold answer: as numbers after
             normalisation ("$1,000.00" == "1000"), as equal text, as a multiple-choice letter and
             its option text (the "A) ..." lines ingest appends to the question), or as equivalent
             math by math-verify ("2/4" == "0.5", "\\frac{1}{2}" == "1/2"). A generation without an
             answer marker counts as wrong; `answer_rate` says how many had one.
gold_loss    mean token NLL of the gold solutions (response + end of turn) given the prompt, pooled
             over all tokens of the evaluated problems: lower = the model finds correct reasoning likelier.
             It moves smoothly where a small model's accuracy sits near zero.

A vision-language model (its processor in place of the tokenizer) generates and is scored with each
problem's images: the prompts go through the processor (placeholders expanded, pixel inputs made per
batch) and model.generate receives the pixels with the ids.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Sequence

import torch
from math_verify import parse, verify

from tasks.core.artifacts import pack_batches
from tasks.core.progress import show_progress
from tasks.core.stage import module_logger
from tasks.curate.answers import extract_final_answer, normalise_answer
from tasks.curate.images import image_paths, text_of
from tasks.curate.vlm import load_images
from tasks.finetune.train import (Example, autocast, collate, decoder_layers, encode, evaluation_precision, padding_id,
                                  processor_of, render, response_nll, text_tokenizer)

_CURRENCY = re.compile(r"^[\$€£¥₹]|[\$€£¥₹%]$")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
_TERM = re.compile(r"\s*([-+*/x×])\s*(-?\d[\d,]*(?:\.\d+)?)")  # one "op operand" after the first number
# "a op b ... = r": numbers joined by operators on the left, one number on the right
_EQUATION = re.compile(r"^(?P<left>-?\d[\d,.]*(?:\s*[-+*/x×]\s*-?\d[\d,.]*)+)\s*=\s*(?P<right>-?\d[\d,]*(?:\.\d+)?)\.?$")
_ANSWER_LINE = re.compile(r"^(?:the )?(?:final )?answer\b|^####", re.IGNORECASE)
_OPTION_LINE = re.compile(r"^\(?([A-J])[).]\s*(.+?)\s*$", re.MULTILINE)
# math-verify warns on every call made without its timeouts; they are off outside the main thread only
logging.getLogger("math_verify").setLevel(logging.ERROR)
log = module_logger(__name__)


def numeric_value(answer: str) -> Decimal | None:
    """The number an answer states ("€1,980", "12.50", "-3", "45%"), or None if it is not one number."""
    text = normalise_answer(_CURRENCY.sub("", normalise_answer(answer)))  # again: "€1,980" -> "1,980" -> "1980"
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def options_of(question: str) -> dict[str, str]:
    """Multiple-choice options "A) text" / "(B) text" / "C. text", one per line of the question."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question)}


def equivalent_math(predicted: str, gold: str) -> bool:
    """math-verify's equivalence (sympy): fractions, decimals, LaTeX, thousands separators, sets, intervals.

    Its timeouts use SIGALRM, which only the main thread may set; elsewhere (a Prefect worker thread)
    they are off, fine for the short extracted answers compared here."""
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parsed(answer: str) -> list:
        # bare LaTeX ("\\dfrac{3}{4}", as ingest's normalise_answer leaves it) needs math delimiters to be read
        return parse(f"${answer}$" if "\\" in answer else answer, parsing_timeout=timeout)

    gold_parsed, predicted_parsed = parsed(gold), parsed(predicted)
    return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def answers_match(predicted: str, gold: str, options: dict[str, str] | None = None) -> bool:
    """Equal as numbers, as normalised text, as a letter and its option text, or as equivalent math."""
    predicted_number, gold_number = numeric_value(predicted), numeric_value(gold)
    if predicted_number is not None and gold_number is not None:
        return predicted_number == gold_number
    predicted_text, gold_text = normalise_answer(predicted).strip(), normalise_answer(gold).strip()
    if predicted_text == gold_text:
        return True
    texts = {letter: normalise_answer(text).strip() for letter, text in (options or {}).items()}
    if predicted_text in texts or gold_text in texts:  # a letter stands for its option text, either way round
        predicted_text, gold_text = texts.get(predicted_text, predicted_text), texts.get(gold_text, gold_text)
        if predicted_text == gold_text:
            return True
    return equivalent_math(predicted_text, gold_text)


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def arithmetic_steps(generation: str, question: str) -> tuple[int, int]:
    """(steps, steps that are arithmetically right and chained) of a generation written one equation per line.

    A step is a non-empty line before the answer line ("The answer is ..."). It is good when it is an equation
    "a op b [op c ...] = r" whose left side evaluates to r exactly (+ - * / x, left to right, as the traces write
    running totals) and whose first number is the result the previous equation wrote (the first equation's: a
    number of the question). A line of prose, a wrong result, or a step that starts from a number never written
    (a skipped step) is not good: the process metric of issue 21, read from the text alone. It does not check
    that a step copies the question's operation (exact match does); traces not written as equations score 0.
    An irrelevant computation costs twice: it is not chained, and the step after it does not start from its
    result; so does a prose line before the answer ("So the answer is 7." is the answer line, not a step)."""
    lines = [line.strip() for line in generation.split("\n") if line.strip()]
    answer_at = next((i for i, line in enumerate(lines) if _ANSWER_LINE.match(line)), len(lines))
    steps = lines[:answer_at]  # what follows the answer line is not reasoning
    question_numbers = {_number(n) for n in _NUMBER.findall(question)}
    previous, good = None, 0
    for line in steps:
        match = _EQUATION.match(line)
        if match is None:  # prose: not a good step, and the chain goes on from the last equation
            continue
        first = _NUMBER.match(match["left"])
        terms = _TERM.findall(match["left"][first.end():])  # [(op, operand)]: "5 - -3" is ("-", "-3")
        numbers = [_number(first.group())] + [_number(operand) for _, operand in terms]
        value = numbers[0]
        try:
            for (operator, _), operand in zip(terms, numbers[1:]):
                value = {"+": value + operand, "-": value - operand, "*": value * operand, "x": value * operand,
                         "×": value * operand, "/": value / operand if operand else None}[operator]
        except TypeError:  # a division by zero left None
            value = None
        chained = numbers[0] in question_numbers if previous is None else numbers[0] == previous
        good += value is not None and value == _number(match["right"]) and chained
        previous = _number(match["right"])  # the result as written: the next step must start from it
    return len(steps), good


def score_generations(generations: Sequence[str], golds: Sequence[str], patterns: Sequence[str],
                      questions: Sequence[str] | None = None) -> list[dict]:
    """Per generation: the extracted answer (None without a marker), its marker kind, and correctness."""
    scored = []
    questions = questions if questions is not None else [""] * len(golds)
    for generation, gold, question in zip(generations, golds, questions, strict=True):
        found = extract_final_answer(generation, patterns)
        predicted, source = found if found is not None else (None, None)
        scored.append({"predicted": predicted, "source": source,
                       "correct": predicted is not None and answers_match(predicted, gold, options_of(question))})
    return scored


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
             images: Sequence[Sequence[str]] | None = None, precision: str | None = None) -> list[str]:
    """Greedy continuations of `prompts`, batched by prompt length with left padding; in input order.

    `images`: per prompt its image files, where `tokenizer` is a VLM's processor."""
    device = str(next(model.parameters()).device)
    text_tokenizer(tokenizer).padding_side = "left"  # generation appends on the right, so pads go left
    if text_tokenizer(tokenizer).pad_token is None:  # e.g. SmolLM2 converted by transformers 5.17: batches need one
        text_tokenizer(tokenizer).pad_token = text_tokenizer(tokenizer).eos_token  # masked anyway (padding_id)
    # by text length (image tokens not counted: each chart adds the same number, the order barely moves)
    lengths = [len(text_tokenizer(tokenizer)(prompt, add_special_tokens=False)["input_ids"]) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    outputs: dict[int, str] = {}
    progress = show_progress("generate", len(prompts), "problem", log, leave=False)  # a batch can take minutes
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if images is not None and any(images[i] for i in chunk):  # image placeholders expanded, pixels made
            encoded = tokenizer(text=[prompts[i] for i in chunk], images=[load_images(images[i]) for i in chunk],
                                return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        else:
            encoded = text_tokenizer(tokenizer)([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                                add_special_tokens=False).to(device)
        with autocast(device, precision):
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=padding_id(tokenizer))  # (B, T_prompt + T_new)
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]  # (B, T_new)
        for index, text in zip(chunk, text_tokenizer(tokenizer).batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[index] = text
        progress.update(len(chunk))
    progress.close()
    return [outputs[i] for i in range(len(prompts))]


@torch.inference_mode()
def gold_nll(model, examples: list[Example], pad_id: int, batch_tokens: int,
             trunk: tuple[int, list[torch.Tensor]] | None = None, processor=None,
             precision: str | None = None) -> tuple[list[float], list[int]]:
    """Per example: summed NLL of its completion tokens, and their count (teacher forcing).

    `trunk` = (first top layer, the examples' trunk states): run only the top layers (tasks/finetune/trunk.py);
    `processor`: a VLM's, the examples' pixel inputs go with them (train.collate)."""
    device = str(next(model.parameters()).device)
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    with contextlib.nullcontext() if trunk is None else decoder_layers(model, trunk[0]):
        for indices in pack_batches([len(example.input_ids) for example in examples], batch_tokens):
            states = None if trunk is None else [trunk[1][i] for i in indices]
            with autocast(device, precision):
                nll, n = response_nll(model, collate([examples[i] for i in indices], pad_id, device, states,
                                                     processor))
            for row, index in enumerate(indices):
                sums[index], counts[index] = float(nll[row]), int(n[row])
    return sums, counts


def evenly_spaced(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over `items` (every template keeps its share); all if limit is None."""
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i * len(items) // limit] for i in range(limit)]


def evaluate(model, tokenizer, problems: list[dict], params, patterns: Sequence[str],
             trunk: tuple[int, list[torch.Tensor]] | None = None) -> dict:
    """Gold loss on all `problems`, accuracy on params.accuracy_problems of them (generation is the cost).

    A problem is a dict with id, prompt_messages (a list of turns), response and final_answer;
    `trunk`: (first top layer, the problems' trunk states) for the gold loss, see gold_nll.
    """
    asked = evenly_spaced(problems, params.accuracy_problems)
    prompts = [render(tokenizer, problem["prompt_messages"], problem["response"])[0] for problem in asked]
    images = [image_paths(problem["prompt_messages"]) for problem in asked] if processor_of(tokenizer) else None
    precision = evaluation_precision(getattr(params, "precision", None), str(next(model.parameters()).device))
    generations = generate(model, tokenizer, prompts, params.max_new_tokens, params.eval_batch_size, images, precision)
    questions = [text_of(next((m["content"] for m in reversed(problem["prompt_messages"]) if m["role"] == "user"), ""))
                 for problem in asked]
    scored = score_generations(generations, [problem["final_answer"] for problem in asked], patterns, questions)
    examples = [encode(tokenizer, problem["prompt_messages"], problem["response"], params.max_seq_len)
                for problem in problems]
    sums, counts = gold_nll(model, examples, padding_id(tokenizer), params.batch_tokens, trunk, processor_of(tokenizer),
                            precision)
    steps = [arithmetic_steps(generation, question) for generation, question in zip(generations, questions)]
    n = len(asked)
    return {
        "n_problems": len(problems),
        "n_accuracy_problems": n,
        "accuracy": sum(item["correct"] for item in scored) / n if n else None,
        "answer_rate": sum(item["predicted"] is not None for item in scored) / n if n else None,
        "gold_loss": sum(sums) / sum(counts) if sum(counts) else None,
        "gold_truncated": sum(example.truncated for example in examples),
        # pooled over every generated step: one long wrong generation weighs more than a short one
        "step_accuracy": sum(good for _, good in steps) / sum(n for n, _ in steps) if sum(n for n, _ in steps) else None,
        "predictions": [{"id": problem["id"], "gold": problem["final_answer"], **item, "n_steps": n_steps,
                         "n_good_steps": good, "generation": generation}
                        for problem, item, generation, (n_steps, good) in zip(asked, scored, generations, steps)],
    }
