"""The calibrated testbed data/arith_chains (issue 21): its generator is deterministic, the committed files are
its output, and every label says what the trace really holds (checked by recomputing each chain)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_arith_chains as testbed  # noqa: E402

EQUATION = re.compile(r"^(-?\d+) ([-+*]) (\d+)(?: ([-+]) (\d+))? = (-?\d+)$")
ANSWER_BREAKING = {"operator_flip", "systematic", "random_wrong"}


@pytest.fixture(scope="module")
def built():
    return testbed.build()


def _ops_of(question: str) -> tuple[int, list[tuple[str, int]]]:
    """The start number and the (op, operand) list, read back from the question text."""
    start = int(re.search(r"\d+", question).group())
    words = re.findall(r"(add|subtract|finds|gets|buys|is given|gives away|loses|uses|sells) (\d+)", question)
    return start, [("+" if word in ("add", "finds", "gets", "buys", "is given") else "-", int(b)) for word, b in words]


def test_the_committed_files_are_the_generators_output(built, tmp_path):
    testbed.main(["--out", str(tmp_path)])
    for name in ("pool", "labels", "test", "ood"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (REPO / "data/arith_chains" / f"{name}.jsonl").read_bytes()
    assert testbed.build() == built  # seeded: the same rows every time
    assert testbed.build(seed=1)["pool"] != built["pool"]


def test_sizes_shares_and_disjoint_splits(built):
    assert [len(built[name]) for name in ("pool", "labels", "test", "ood")] == [1200, 1200, 100, 100]
    kinds = Counter(label["corruption"] for label in built["labels"])
    for kind, share in testbed.SHARES.items():
        assert kinds[kind] == round(share * 1200)
    assert kinds[None] == 1200 - sum(round(share * 1200) for share in testbed.SHARES.values())
    questions = [{row["question"] for row in built[name]} for name in ("pool", "test", "ood")]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    longest_pool = max(len(_ops_of(row["question"])[1]) for row in built["pool"])
    assert min(len(_ops_of(row["question"])[1]) for row in built["ood"]) > longest_pool  # longer than any pool chain


def test_every_label_matches_its_trace(built):
    """Recompute each chain from its question: clean traces are right; each corruption is what its label says."""
    for row, label in zip(built["pool"], built["labels"]):
        assert row["id"] == label["id"]
        start, ops = _ops_of(row["question"])
        truth = start
        for op, b in ops:
            truth = truth + b if op == "+" else truth - b
        *lines, answer_line = row["answer"].split("\n")
        answer = int(re.fullmatch(r"The answer is (-?\d+)\.", answer_line).group(1))
        assert label["n_steps"] == len(lines)
        kind, bad = label["corruption"], label["bad_step"]
        assert label["corrupted"] == (kind is not None)
        assert (answer == truth) == (kind not in ANSWER_BREAKING), (row, label)
        parsed = [EQUATION.match(line) for line in lines]
        assert all(parsed), row
        results = [int(m.group(6)) for m in parsed]
        wrong = [i for i, m in enumerate(parsed) if (int(m.group(1)) + (1 if m.group(2) == "+" else -1) * int(m.group(3))
                 + ((1 if m.group(4) == "+" else -1) * int(m.group(5)) if m.group(4) else 0)) != results[i]
                 and m.group(2) != "*"]
        unchained = [i for i in range(1, len(parsed)) if int(parsed[i].group(1)) != results[i - 1]
                     and parsed[i].group(2) != "*" and parsed[i - 1].group(2) != "*"]
        if kind is None:
            assert not wrong and not unchained and len(lines) == len(ops)
        elif kind == "systematic":
            assert wrong and wrong[0] == bad and all(parsed[i].group(2) == "-" for i in wrong)
        elif kind in ("random_wrong", "unsupported_jump"):
            assert wrong == [bad]
            assert (bad + 1 in unchained) == (kind == "unsupported_jump")
        elif kind == "operator_flip":
            assert not wrong and parsed[bad].group(2) != ops[bad][0]
        elif kind == "skipped_step":
            assert not wrong and unchained == [bad] and len(lines) == len(ops) - 1
        elif kind == "merged_steps":
            assert not wrong and parsed[bad].group(4) and len(lines) == len(ops) - 1
        elif kind == "irrelevant_step":
            assert parsed[bad].group(2) == "*" and len(lines) == len(ops) + 1
