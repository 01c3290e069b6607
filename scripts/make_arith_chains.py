"""Make data/arith_chains: the calibrated testbed (issue 21), a pool whose data quality a 135M model can feel.

    python scripts/make_arith_chains.py --out data/arith_chains          # seeded: the same files every time

A running-total task a small model learns on a CPU in minutes: the question lists the operations, the
response writes one operation per line and ends with "The answer is N." Two surface families share the
arithmetic, so a selector cannot tell them apart by format alone:
    chain  "Start with 34. Then add 9, then add 8, then subtract 12. What is the final number?"
    story  "Mia has 34 shells. She finds 9 more, then finds 8 more, then gives away 12. How many shells ..."
    response (both)  "34 + 9 = 43\\n43 + 8 = 51\\n51 - 12 = 39\\nThe answer is 39."

Corruptions, each a step-level signal GRACE claims to read (labels.jsonl: type and first bad step):
    operator_flip     one operation copied with the wrong operator from the question ("subtract 12" written
                      and computed as "+ 12"), propagated: the copy error the issue found most harmful
    systematic        every subtraction's result one too high, propagated (one consistent rule, like
                      pair-flip label noise: it teaches a wrong rule)
    random_wrong      one result off by a random amount, propagated (the control: noise, not a rule)
    unsupported_jump  one result wrong, and the next step ignores it (continues from the right value)
    skipped_step      one operation's line missing: the next line starts from a total never computed
    merged_steps      two operations in one line ("43 + 8 - 12 = 39"): right, but two steps at once
    irrelevant_step   an unused computation on a number of the question inserted ("9 * 2 = 18")
The first three end in a wrong final answer; the last four keep it right and break the process only.
Shares (of the pool): SHARES below, chosen before any selector was run on the testbed (issue 21: the
testbed is fixed by its own gates, never by how a selector fares), with answer-breaking errors the
larger part since those are the ones SFT on a small model demonstrably learns from.

Splits: pool.jsonl (1,200, 2-5 operations), test.jsonl (100 clean, questions disjoint from the pool's),
ood.jsonl (100 clean, 7-8 operations: longer than any pool chain), labels.jsonl (pool only; never read
by curation). Every file is {"id", "question", "answer"} (GSM8K-like: the answer field is the response).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261204
N_POOL, N_TEST, N_OOD = 1200, 100, 100
POOL_OPS, OOD_OPS = (2, 5), (7, 8)  # operations per chain, inclusive
SHARES = {  # corruption -> share of the pool; the rest is clean (45%)
    "operator_flip": 0.20, "systematic": 0.12, "random_wrong": 0.06, "unsupported_jump": 0.05,
    "skipped_step": 0.04, "merged_steps": 0.04, "irrelevant_step": 0.04}
NAMES = ["Mia", "Leo", "Ava", "Sam", "Noor", "Ivan", "Zoe", "Omar", "Lena", "Ravi", "Emma", "Kai"]
ITEMS = ["shells", "stamps", "marbles", "coins", "cards", "stickers", "beads", "apples"]
GAINS = ["finds {b} more", "gets {b} more", "buys {b} more", "is given {b} more"]
LOSSES = ["gives away {b}", "loses {b}", "uses {b}", "sells {b}"]


def make_problem(rng: random.Random, n_ops: int) -> dict:
    """A start value and n_ops (op, operand) pairs whose running total stays in [0, 150]."""
    start = total = rng.randint(10, 60)
    ops: list[tuple[str, int]] = []
    for _ in range(n_ops):
        operand = rng.randint(2, 19)
        op = rng.choice("+-") if operand <= total and total + operand <= 150 else ("-" if total + operand > 150 else "+")
        total = total + operand if op == "+" else total - operand
        ops.append((op, operand))
    family = rng.choice(["chain", "story"])
    if family == "chain":
        phrases = [("add" if op == "+" else "subtract") + f" {b}" for op, b in ops]
        question = f"Start with {start}. Then " + ", then ".join(phrases) + ". What is the final number?"
    else:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        pronoun = "She" if name in ("Mia", "Ava", "Noor", "Zoe", "Lena", "Emma") else "He"
        phrases = [rng.choice(GAINS if op == "+" else LOSSES).format(b=b) for op, b in ops]
        question = (f"{name} has {start} {item}. {pronoun} " + ", then ".join(phrases)
                    + f". How many {item} does {pronoun.lower()} have now?")
    return {"family": family, "start": start, "ops": ops, "question": question}


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b


def clean_lines(problem: dict) -> list[tuple[int, str, int, int]]:
    """(a, op, b, result) per operation, computed right."""
    lines, total = [], problem["start"]
    for op, b in problem["ops"]:
        lines.append((total, op, b, apply(op, total, b)))
        total = lines[-1][3]
    return lines


def render(lines: list[str], answer: int) -> str:
    return "\n".join(lines + [f"The answer is {answer}."])


def corrupt(problem: dict, kind: str, rng: random.Random) -> tuple[str, int] | None:
    """(the corrupted response, index of its first bad step), or None if this problem cannot carry `kind`."""
    ops, n = problem["ops"], len(problem["ops"])
    text = lambda a, op, b, c: f"{a} {op} {b} = {c}"  # noqa: E731
    if kind in ("operator_flip", "systematic", "random_wrong"):
        subtractions = [i for i, (op, _) in enumerate(ops) if op == "-"]
        if kind == "systematic" and not subtractions:
            return None
        bad = rng.randrange(n) if kind != "systematic" else subtractions[0]
        delta = rng.choice([d for d in range(-9, 10) if d != 0])
        total, lines = problem["start"], []
        for i, (op, b) in enumerate(ops):
            written = ("+" if op == "-" else "-") if kind == "operator_flip" and i == bad else op
            result = apply(written, total, b)
            if kind == "systematic" and op == "-":
                result += 1  # every subtraction one too high: a consistent wrong rule
            if kind == "random_wrong" and i == bad:
                result += delta
            lines.append(text(total, written, b, result))
            total = result
        return render(lines, total), bad
    right = clean_lines(problem)
    lines = [text(*line) for line in right]
    if kind == "unsupported_jump":  # a wrong result the next step ignores: needs a next step
        bad = rng.randrange(n - 1)
        a, op, b, c = right[bad]
        lines[bad] = text(a, op, b, c + rng.choice([d for d in range(-9, 10) if d != 0]))
        return render(lines, right[-1][3]), bad
    if kind == "skipped_step":  # a middle line dropped: the next one starts from an unseen total
        if n < 3:
            return None
        skipped = rng.randrange(1, n - 1)
        del lines[skipped]
        return render(lines, right[-1][3]), skipped
    if kind == "merged_steps":  # two operations in one line
        first = rng.randrange(n - 1)
        a, op1, b1, _ = right[first]
        _, op2, b2, c2 = right[first + 1]
        lines[first: first + 2] = [f"{a} {op1} {b1} {op2} {b2} = {c2}"]
        return render(lines, right[-1][3]), first
    if kind == "irrelevant_step":  # an unused computation on one of the question's numbers
        at = rng.randrange(1, n + 1)
        b = ops[rng.randrange(n)][1]
        lines.insert(at, f"{b} * 2 = {2 * b}")
        return render(lines, right[-1][3]), at
    raise ValueError(kind)


def build(seed: int = SEED) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()

    def fresh(n_ops_range: tuple[int, int]) -> dict:
        while True:
            problem = make_problem(rng, rng.randint(*n_ops_range))
            if problem["question"] not in seen:  # every question once across all splits
                seen.add(problem["question"])
                return problem

    kinds = [kind for kind, share in SHARES.items() for _ in range(round(share * N_POOL))]
    kinds += [None] * (N_POOL - len(kinds))
    rng.shuffle(kinds)
    pool, labels = [], []
    for index, kind in enumerate(kinds):
        while True:
            problem = fresh(POOL_OPS)
            right = clean_lines(problem)
            made = (render([f"{a} {op} {b} = {c}" for a, op, b, c in right], right[-1][3]), None) \
                if kind is None else corrupt(problem, kind, rng)
            if made is not None:
                break
        response, bad_step = made
        id_ = f"arith-{index:04d}"
        pool.append({"id": id_, "question": problem["question"], "answer": response})
        labels.append({"id": id_, "template": f"{problem['family']}-{len(problem['ops'])}", "family": problem["family"],
                       "corrupted": kind is not None, "corruption": kind, "bad_step": bad_step,
                       "n_steps": response.count("\n")})

    def clean_split(prefix: str, n: int, ops_range: tuple[int, int]) -> list[dict]:
        rows = []
        for index in range(n):
            problem = fresh(ops_range)
            right = clean_lines(problem)
            rows.append({"id": f"{prefix}-{index:04d}", "question": problem["question"],
                         "answer": render([f"{a} {op} {b} = {c}" for a, op, b, c in right], right[-1][3])})
        return rows

    return {"pool": pool, "labels": labels, "test": clean_split("arithtest", N_TEST, POOL_OPS),
            "ood": clean_split("arithood", N_OOD, OOD_OPS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/arith_chains"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(args.seed).items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{args.out / (name + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()
