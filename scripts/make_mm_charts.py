"""Make the small multimodal sample data/mm_charts: rendered bar charts, questions with computed answers.

    python scripts/make_mm_charts.py --out data/mm_charts --n 120 --seed 0 --n-test 40

Each chart is drawn with Pillow's ImageDraw (no plotting library): 3-5 labelled bars with their values
written above them. The question asks for a total, a difference or the largest bar; the solution
reads the bars one per line, computes step by step and ends "#### <answer>". About 40% of the rows
are corrupted on purpose (labels.jsonl says which and where, the pool does not):
  misread_bar        one bar is read with a wrong value, the steps after it follow from that value
  wrong_step_result  one arithmetic step has a wrong result, the rest follow from it
  wrong_final_answer the steps are right, the final line is not
--n-test more charts, never corrupted, are the fine-tune table's held-out problems (test.jsonl, ids
test-NNNN, their own rng: the pool's bytes do not depend on them). Rows are LLaVA/ShareGPT records,
{"id", "image": "images/<id>.png", "conversations": [human "<image>\\n
question", gpt solution]}, read with ingest.preset sharegpt and ingest.image_root data/mm_charts.
Deterministic for a seed (PNG bytes included), so the sample and its DVC hashes are reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WIDTH, HEIGHT = 224, 168  # small: ~ (224/14)^2 = 256 vision patches before any merge
LABELS = ["A", "B", "C", "D", "E"]
COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
CORRUPTIONS = ("misread_bar", "wrong_step_result", "wrong_final_answer")


def draw_chart(values: list[int], path: Path) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    top, bottom, left = 20, HEIGHT - 20, 10
    draw.line([(left, bottom), (WIDTH - 10, bottom)], fill="black")
    slot = (WIDTH - 2 * left) // len(values)
    for index, value in enumerate(values):
        x0 = left + index * slot + slot // 5
        x1 = left + (index + 1) * slot - slot // 5
        y0 = bottom - int((bottom - top) * value / 20)
        draw.rectangle([x0, y0, x1, bottom], fill=COLOURS[index])
        draw.text((x0, y0 - 12), str(value), fill="black")
        draw.text(((x0 + x1) // 2 - 3, bottom + 4), LABELS[index], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def solve(kind: str, values: list[int], read: list[int], wrong_step: int | None, rng: random.Random
          ) -> tuple[str, list[str], int]:
    """(question, steps, answer) with the bars read as `read` and step `wrong_step` (if any) miscomputed."""
    names = LABELS[:len(values)]
    steps = [f"Bar {name} shows {value}." for name, value in zip(names, read)]
    if kind == "total":
        question = "The bar chart shows one value per bar. What is the total of all the bars?"
        running = read[0]
        for index, value in enumerate(read[1:], start=1):
            result = running + value
            if wrong_step == index:
                result += rng.choice([-3, -2, -1, 1, 2, 3])
            steps.append(f"{running} + {value} = {result}.")
            running = result
        answer = running
    elif kind == "difference":
        high, low = max(range(len(read)), key=read.__getitem__), min(range(len(read)), key=read.__getitem__)
        question = "The bar chart shows one value per bar. How much taller is the tallest bar than the shortest?"
        steps.append(f"The tallest bar is {names[high]} with {read[high]}; the shortest is {names[low]} with {read[low]}.")
        answer = read[high] - read[low]
        if wrong_step is not None:
            answer += rng.choice([-2, -1, 1, 2])
        steps.append(f"{read[high]} - {read[low]} = {answer}.")
    else:
        question = "The bar chart shows one value per bar. What is the value of the tallest bar times 2?"
        high = max(range(len(read)), key=read.__getitem__)
        steps.append(f"The tallest bar is {names[high]} with {read[high]}.")
        answer = read[high] * 2
        if wrong_step is not None:
            answer += rng.choice([-2, 2, 4])
        steps.append(f"{read[high]} * 2 = {answer}.")
    return question, steps, answer


def make_row(index: int, rng: random.Random, out: Path, prefix: str = "chart", clean: bool = False
             ) -> tuple[dict, dict]:
    values = [rng.randint(2, 18) for _ in range(rng.randint(3, 5))]
    while len(set(values)) < len(values):  # distinct bars: the tallest and shortest are unambiguous
        values = [rng.randint(2, 18) for _ in range(len(values))]
    kind = rng.choice(["total", "difference", "double_max"])
    corruption = None if clean else rng.choice(CORRUPTIONS) if rng.random() < 0.4 else None
    read, wrong_step, bad_step = list(values), None, None
    if corruption == "misread_bar":
        bar = rng.randrange(len(values))
        read[bar] = max(1, read[bar] + rng.choice([-3, -2, 2, 3]))
        bad_step = bar
    elif corruption == "wrong_step_result":
        wrong_step = 1 if kind != "total" else rng.randrange(1, len(values))
        bad_step = len(values) + (wrong_step - 1 if kind == "total" else 1)
    question, steps, answer = solve(kind, values, read, wrong_step, rng)
    _, _, true_answer = solve(kind, values, values, None, rng)
    final = answer
    if corruption == "wrong_final_answer":
        final, bad_step = answer + rng.choice([-5, -1, 1, 5]), len(steps)
    row_id = f"{prefix}-{index:04d}"
    draw_chart(values, out / "images" / f"{row_id}.png")
    solution = "\n".join(steps + [f"#### {final}"])
    row = {"id": row_id, "image": f"images/{row_id}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": solution}]}
    label = {"id": row_id, "corrupted": corruption is not None, "corruption": corruption, "bad_step": bad_step,
             "n_steps": len(steps), "kind": kind, "values": values, "answer": true_answer}
    return row, label


def make_sample(out: Path, n: int, seed: int = 0, n_test: int = 0) -> None:
    """Write out/pool.jsonl, out/labels.jsonl and out/images/*.png; with n_test, also out/test.jsonl."""
    rng = random.Random(seed)
    rows, labels = zip(*(make_row(index, rng, out) for index in range(n)))
    (out / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels), encoding="utf-8")
    if n_test:
        test_rng = random.Random(f"test-{seed}")
        tests = [make_row(index, test_rng, out, prefix="test", clean=True)[0] for index in range(n_test)]
        (out / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tests), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/mm_charts"))
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-test", type=int, default=40, help="clean held-out charts for the fine-tune table")
    args = parser.parse_args(argv)
    make_sample(args.out, args.n, args.seed, args.n_test)


if __name__ == "__main__":
    main()
