"""Held-out evaluation: answer matching and accuracy on hand-made generations, generation, gold loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from tasks.finetune import evaluate, train
from tasks.finetune.subsets import Params

PATTERNS = ("gsm8k", "answer_is", "boxed")


@pytest.mark.parametrize("predicted, gold, same", [
    ("1,000", "1000", True),
    ("$12.50", "12.5", True),
    ("€1,980", "1980", True),
    ("45%", "45", True),
    ("-3", "-3.0", True),
    ("\\frac{1}{2}", "\\frac{1}{2}", True),
    ("10", "11", False),
    ("1,2", "12", False),  # not a thousands separator
    # equivalent math (math-verify): the value counts, not its spelling
    ("72 clips", "72", True),
    ("x = 3", "3", True),
    ("2/4", "0.5", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("1,000", "1000", True),
    ("\\sqrt{4}", "2", True),
    ("1/3", "0.33", False),
    ("B", "50", False),
])
def test_answers_match_after_numeric_normalisation(predicted, gold, same):
    assert evaluate.answers_match(predicted, gold) is same


@pytest.mark.parametrize("predicted, gold, same", [
    ("B", "B", True), ("50 km/h", "B", True), ("B", "50 km/h", True), ("50", "B", True),  # 50 km/h as math
    ("C", "B", False), ("40 km/h", "B", False), ("(B)", "B", True),
])
def test_a_letter_and_its_option_text_compare_equal(predicted, gold, same):
    options = evaluate.options_of("A car covers 150 km in 3 h. Speed?\nA) 40 km/h\nB) 50 km/h\n(C) 60 km/h")
    assert options == {"A": "40 km/h", "B": "50 km/h", "C": "60 km/h"}
    assert evaluate.answers_match(predicted, gold, options) is same


def test_score_generations_reads_answers_like_ingest_and_counts_misses_as_wrong():
    generations = [
        "Natalia sold 48/2 = 24 clips.\n#### 72",  # right
        "She earns 0.2 x 50 = 10. The answer is 10.",  # right, "answer is" marker
        "So it costs \\boxed{$1,234}",  # right after normalisation
        "He works 8 days a month.\n#### 96\nWait, #### 90",  # the LAST marker counts, as in ingest: wrong
        "I think it is 5 apples",  # no marker: no answer, wrong
    ]
    golds = ["72", "10", "1234", "96", "5"]
    scored = evaluate.score_generations(generations, golds, PATTERNS)
    assert [item["predicted"] for item in scored] == ["72", "10", "1234", "90", None]
    assert [item["source"] for item in scored] == ["gsm8k", "answer_is", "boxed", "gsm8k", None]
    assert [item["correct"] for item in scored] == [True, True, True, False, False]
    only_gsm = evaluate.score_generations(generations[1:2], golds[1:2], ("gsm8k",))
    assert only_gsm[0]["predicted"] is None  # the configured patterns decide what counts as an answer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model_dir, tokenizer):
    model = train.load_model(tiny_model_dir, "cpu")
    prompts = [train.render(tokenizer, [{"role": "user", "content": text}], "")[0]
               for text in ["Hi", "What is 48 plus 24 in April and May?", "Weng earns $12 an hour."]]
    batched = evaluate.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [evaluate.generate(model, tokenizer, [prompt], max_new_tokens=6, batch_size=1)[0] for prompt in prompts]
    assert batched == single and all(batched)


def test_generation_pads_with_the_end_of_sequence_where_the_tokenizer_has_no_pad_token(tiny_model_dir):
    """A tokenizer saved without a pad token (SmolLM2 converted by transformers 5.17 on the GPU host) could not
    batch prompts ("Asking to pad but the tokenizer does not have a padding token"): it pads with its end of
    sequence, which the attention mask hides, so the generations are the padded tokenizer's."""
    model = train.load_model(tiny_model_dir, "cpu")
    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    padded = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.pad_token = None
    prompts = [train.render(padded, [{"role": "user", "content": text}], "")[0] for text in ["Hi", "What is 4 plus 2?"]]
    assert evaluate.generate(model, bare, prompts, max_new_tokens=5, batch_size=2) == [
        evaluate.generate(model, padded, [prompt], max_new_tokens=5, batch_size=1)[0] for prompt in prompts]


def test_evaluate_accuracy_and_gold_loss(tiny_model_dir, tokenizer):
    model = train.load_model(tiny_model_dir, "cpu")
    problems = [{"id": f"p{i}", "prompt_messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                 "response": f"{i}+{i} = {2 * i}\n#### {2 * i}", "final_answer": str(2 * i)} for i in range(3)]
    params = Params(max_new_tokens=4, eval_batch_size=2, batch_tokens=64, accuracy_problems=None, device="cpu")
    result = evaluate.evaluate(model, tokenizer, problems, params, PATTERNS)
    assert result["n_problems"] == 3 and [p["id"] for p in result["predictions"]] == ["p0", "p1", "p2"]
    fewer = evaluate.evaluate(model, tokenizer, problems, dataclasses.replace(params, accuracy_problems=2), PATTERNS)
    assert [p["id"] for p in fewer["predictions"]] == ["p0", "p1"] and fewer["n_accuracy_problems"] == 2
    assert fewer["gold_loss"] == pytest.approx(result["gold_loss"])  # gold loss: always every problem
    correct = [p["correct"] for p in result["predictions"]]
    assert result["accuracy"] == sum(correct) / 3 and result["answer_rate"] <= 1
    examples = [train.encode(tokenizer, p["prompt_messages"], p["response"], 512) for p in problems]
    with torch.no_grad():  # token-pooled mean over all gold tokens, one example at a time
        sums, counts = zip(*[train.response_nll(model, train.collate([e], tokenizer.pad_token_id, "cpu"))
                             for e in examples])
    expected = float(sum(s.sum() for s in sums) / sum(c.sum() for c in counts))
    assert result["gold_loss"] == pytest.approx(expected, rel=1e-5)


def test_evenly_spaced_keeps_every_part_of_the_list():
    assert evaluate.evenly_spaced(list(range(10)), 3) == [0, 3, 6]
    assert evaluate.evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7]
    assert evaluate.evenly_spaced([1, 2], None) == [1, 2] and evaluate.evenly_spaced([1, 2], 5) == [1, 2]


Q = "Start with 34. Then add 9, then add 8, then subtract 12. What is the final number?"


@pytest.mark.parametrize("generation, expected", [
    ("34 + 9 = 43\n43 + 8 = 51\n51 - 12 = 39\nThe answer is 39.", (3, 3)),  # right and chained
    ("34 + 9 = 43\n43 + 8 = 52\n52 - 12 = 40\nThe answer is 40.", (3, 2)),  # one wrong result; the next chains on
    ("34 + 9 = 43\n51 - 12 = 39\nThe answer is 39.", (2, 1)),  # a skipped step: 51 was never written
    ("34 + 9 = 43\nNote this.\n43 + 8 = 51", (3, 2)),  # prose is a step, not good; the chain goes on
    ("34 + 9 + 8 = 51\n51 - 12 = 39", (2, 2)),  # merged operations are arithmetic all the same
    ("35 + 9 = 44", (1, 0)),  # the first step starts from no number of the question
    ("34 - -3 + 2 = 39", (1, 1)),  # a negative operand is an operand, not an operator
    ("34 + 9 = 43\nThe answer is 43.\n43 + 8 = 51", (1, 1)),  # after the answer line nothing counts
    ("The answer is 39.", (0, 0)),
    ("34 x 2 = 68\n68 / 4 = 17", (2, 2)),
])
def test_arithmetic_steps_counts_right_and_chained_steps(generation, expected):
    assert evaluate.arithmetic_steps(generation, Q) == expected
