"""Stage report: a self-contained page with every stage's counts, thresholds and example traces."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.core.stage import read_quarantine
from tasks.curate import svgplot
from tasks.curate.report import Params, report
from tests.tasks.outputs_tree import STAGE_STATS, build_outputs

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def outputs(tmp_path):
    """30 traces; subsets top10pct (3) and top20pct (6): 6 kept, 24 rejected."""
    built = build_outputs(tmp_path / "outputs", n=30, fractions=(0.1, 0.2))
    return tmp_path / "outputs", built


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_has_every_stage_count_and_the_example_traces(outputs):
    root, built = outputs
    stats = report(root, root / "report", Params(n_examples=4))
    html = (root / "report/report.html").read_text()
    for stage, counts in STAGE_STATS.items():
        row = f"<tr><td>{stage}</td><td>{counts['read']}</td><td>{counts['kept']}</td><td>{counts['quarantined']}</td>"
        assert row in html, stage
        for key, n in counts.items():
            if key.startswith("quarantined_"):
                assert f"{key.removeprefix('quarantined_')}: {n}" in html
    assert html.count('<div class="trace">') == 8  # 4 kept + 4 rejected
    kept_part, rejected_part = html.split("<h3>Kept (4)</h3>")[1].split("<h3>Rejected (4)</h3>")
    in_subsets = set(built["subsets"]["top20pct"])
    assert {i for i in re.findall(r"<b>(t\d+)</b>", kept_part)} <= in_subsets
    assert not {i for i in re.findall(r"<b>(t\d+)</b>", rejected_part)} & in_subsets
    assert (stats["read"], stats["kept"], stats["examples_kept"], stats["examples_rejected"]) == (8, 8, 4, 4)
    assert json.loads((root / "report/stats.json").read_text()) == stats


def test_report_is_self_contained(outputs):
    root, _ = outputs
    report(root, root / "report", Params())
    html = (root / "report/report.html").read_text()
    assert not re.search(r"https?://", html)  # no CDN, no remote image, not even an xmlns URL
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert not [ref for ref in re.findall(r'(?:src|href)="([^"]*)"', html) if not ref.startswith("#")]
    for svg in re.findall(r"<svg.*?</svg>", html, re.S):
        ET.fromstring(svg)  # every chart is well-formed XML


def test_thresholds_are_marked_and_steps_coloured_by_score(outputs):
    root, built = outputs
    report(root, root / "report", Params(n_examples=30))  # every trace shown
    html = (root / "report/report.html").read_text()
    for name, ids in built["subsets"].items():
        assert f"{name} &gt;= {min(built['scores'][i] for i in ids):.3g}" in html
    steps = pq.read_table(root / "score/step_scores.parquet").to_pylist()
    spans = re.findall(r'<span class="step" style="background:(rgb\([^)]*\))" title="step (\d+): score ([-\d.]+)', html)
    assert len(spans) == len(steps)  # every step of every shown trace is drawn
    best = max(steps, key=lambda r: r["step_score"])
    worst = min(steps, key=lambda r: r["step_score"])
    colour_of = {float(score): colour for colour, _, score in spans}
    # Positive scores lean blue, negative ones red.
    r, g, b = map(int, re.findall(r"\d+", colour_of[round(best["step_score"], 3)]))
    assert b > r
    r, g, b = map(int, re.findall(r"\d+", colour_of[round(worst["step_score"], 3)]))
    assert r > b


def test_plot_data_matches_the_scores(outputs):
    root, built = outputs
    report(root, root / "report", Params(bins=10, max_points=12))
    hist = read_csv(root / "report/plots/score_hist.csv")
    assert len(hist) == 10 and sum(int(r["count"]) for r in hist) == 30
    scatter = read_csv(root / "report/plots/alpha_consistency.csv")
    assert len(scatter) == 12 and set(scatter[0]) == {"alpha", "consistency"}
    sizes = read_csv(root / "report/plots/subset_size.csv")
    scores = sorted(built["scores"].values())
    for row in sizes:
        assert int(row["n_selected"]) == sum(s >= float(row["threshold"]) for s in scores)
    assert int(sizes[0]["n_selected"]) == 30


def test_unrenderable_trace_is_quarantined_not_dropped(outputs):
    root, built = outputs
    table = pq.read_table(root / "segment/segments.parquet")
    rows = table.to_pylist()
    broken = built["subsets"]["top10pct"][0]
    for row in rows:
        if row["id"] == broken:
            row["step_ends"][0] = len(row["scored_response"]) + 5
    pq.write_table(table.from_pylist(rows, schema=table.schema), root / "segment/segments.parquet")
    stats = report(root, root / "report", Params(n_examples=6))  # all 6 kept traces are picked
    quarantine = read_quarantine(root / "report/quarantine.jsonl")
    assert [(q["id"], q["reason"]) for q in quarantine] == [(broken, "bad_spans")]
    assert (stats["read"], stats["kept"], stats["examples_kept"]) == (12, 11, 5)
    assert f"<b>{broken}</b>" not in (root / "report/report.html").read_text()


def test_kept_examples_say_which_turn_was_scored_and_that_the_score_is_no_correctness_check(outputs):
    root, built = outputs
    table = pq.read_table(root / "segment/segments.parquet")
    rows = table.to_pylist()
    multi, single = built["subsets"]["top10pct"][:2]
    for row in rows:
        if row["id"] == multi:  # two earlier exchanges: the scored response is the third assistant turn
            prompt = json.loads(row["prompt_messages"])
            earlier = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}] * 2
            row["prompt_messages"] = json.dumps(earlier + prompt)
    pq.write_table(table.from_pylist(rows, schema=table.schema), root / "segment/segments.parquet")
    report(root, root / "report", Params(n_examples=6))  # all 6 kept traces are shown
    page = (root / "report/report.html").read_text()
    meta = {id_: line for id_, line in re.findall(r'<div class="meta"><b>(t\d+)</b>(.*?)</div>', page)}
    assert meta[multi].endswith("&middot; turn 3 of 3 scored; 2 earlier turns as context")
    assert "turn" not in meta[single]
    kept = page.split("<h3>Kept (6)</h3>")[1].split('<div class="trace">')[0]  # before the first kept trace
    caveat = html.unescape(kept)
    assert "does not check correctness" in caveat and "deep blue" in caveat
    assert "AUROC 0.45-0.51" in caveat and "docs/calibration.md" in caveat and "docs/selection-study.md" in caveat


def test_colour_scale():
    assert svgplot.diverging_colour(0.0, 1.0) == "rgb(247,247,247)"
    assert svgplot.diverging_colour(None, 1.0) == svgplot.diverging_colour(float("nan"), 1.0) == "#d9d9d9"
    assert svgplot.diverging_colour(5.0, 1.0) == svgplot.diverging_colour(1.0, 1.0)  # clipped at the limit
    assert svgplot.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svgplot.nice_ticks(0, 2, integer=True) == [0, 1, 2]


def test_dvc_plots_show_reads_the_declared_plots(outputs, tmp_path):
    """The report stage's `plots:` in the project's dvc.yaml name columns the stage really writes."""
    root, _ = outputs
    report(root, root / "report", Params())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["report"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout
    data = json.loads(shown)["data"]
    declared = {path: props for plot in stage["plots"] for path, props in plot.items()}
    assert len(declared) == 4 and set(data) == set(declared)
    for path, props in declared.items():
        content = data[path][0]["content"]
        values = content["data"]["values"]
        assert len(values) == len(read_csv(tmp_path / path)), path
        assert {props["x"], props["y"]} <= set(values[0]), path
        assert content["title"]["text"] == props["title"]


def test_page_states_settings_model_validation_and_every_step_number(outputs):
    """What a printed or mailed copy must carry in its text: no tooltips, no colours needed."""
    root, _ = outputs
    report(root, root / "report", Params(n_examples=30))
    html = (root / "report/report.html").read_text()
    for setting, value in [("score.method", "grace"), ("score.gradient", "proxy"), ("score.lambda_", "0.5"),
                           ("score.first_step", "alpha"), ("aggregate.how", "mean"),
                           ("select (fractions, budgets)", "top10pct: top 0.1, top20pct: top 0.2")]:
        assert f'<tr><td>{setting}</td><td class="text">{value}</td></tr>' in html, setting
    assert f"tiny test model &middot; identity <code>{'9f' * 32}</code> &middot; 12,345 parameters" in html
    assert '<span class="passed">passed</span>: 17 expectations in 3 suites' in html
    assert "consistency is its alpha (score.first_step: alpha)" in html
    steps = pq.read_table(root / "score/step_scores.parquet").to_pylist()
    for step in steps:  # every trace is shown: each step's row, numbered from 1 as in the text
        row = (f"<tr><td>{step['step_index'] + 1}</td><td>{step['alpha']:.3f}</td><td>{step['consistency']:.3f}</td>"
               f"<td>{step['step_score']:.3f}</td></tr>")
        assert row in html, step
    assert html.count('<span class="n">') == len(steps)


def test_stage_table_has_select_and_validate_and_cuts_nothing(outputs):
    root, _ = outputs
    long_value = {f"source_{i}": i for i in range(20)}  # a JSON value far longer than a table cell
    stats = json.loads((root / "ingest/stats.json").read_text())
    (root / "ingest/stats.json").write_text(json.dumps({**stats, "answer_source": long_value}))
    (root / "select/stats.json").unlink()  # the real select writes manifest.json only
    report(root, root / "report", Params())
    html = (root / "report/report.html").read_text()
    assert escape(f"answer_source={json.dumps(long_value)}") in html
    assert "<tr><td>select</td><td>30</td><td>30</td><td>0</td>" in html
    assert re.search(r"<tr><td>validate</td>.*?success=true; n_suites=3; n_expectations=17; n_failed=0", html)
    assert re.search(r"<tr><td>model</td>.*?identity=", html)


def test_a_stage_warning_is_shown_first(outputs):
    root, _ = outputs
    stats = json.loads((root / "segment/stats.json").read_text())
    warning = "25 of 30 traces have one step: segment.strategy newline found no step breaks in them"
    (root / "segment/stats.json").write_text(json.dumps({**stats, "warnings": [warning]}))
    report(root, root / "report", Params())
    html = (root / "report/report.html").read_text()
    assert f'<div class="warning"><h2>Warnings</h2><ul><li>segment: {warning}</li></ul></div>' in html
    assert html.index("Warnings") < html.index("<h2>Run</h2>")


def test_failed_validation_is_stated_with_each_failure(outputs):
    root, _ = outputs
    failure = {"expectation": "expect_column_values_to_be_between", "column": "alpha", "observed": "3 of 30"}
    (root / "validate/results.json").write_text(json.dumps({
        "success": False, "n_suites": 3, "n_expectations": 17, "n_failed": 1,
        "suites": {"step_scores": {"failed": [failure]}}}))
    report(root, root / "report", Params())
    html = (root / "report/report.html").read_text()
    assert '<span class="failed">FAILED</span>: 1 of 17 expectations' in html
    assert "<li>step_scores: expect_column_values_to_be_between [alpha] observed 3 of 30</li>" in html


def label_boxes(svg: str) -> list[tuple[float, float, float]]:
    """(left, right, baseline) of each threshold label, from the coordinates and forced width it is drawn with."""
    found = re.findall(r'<text x="([\d.]+)" y="([\d.]+)" textLength="([\d.]+)" lengthAdjust="spacingAndGlyphs" '
                       r'fill="#[0-9a-f]+"[^>]*>([^<]+)</text>', svg)
    for _, _, length, label in found:  # drawn exactly as wide as the layout reserved, whatever the font
        assert float(length) == pytest.approx(svgplot.CHAR_WIDTH * len(html.unescape(label)), abs=0.06)
    return [(float(x), float(x) + float(length), float(y)) for x, y, length, _ in found]


@pytest.mark.parametrize("chart", ["histogram", "subset_size"])
def test_threshold_labels_never_overlap(chart):
    close = [(0.50, "top5pct >= 0.5"), (0.49, "top10pct >= 0.49"), (0.485, "top20pct >= 0.485"),
             (0.10, "budget >= 0.1"), (0.59, "top1pct >= 0.59"), (0.0, "budget100000tok >= 0")]
    edges = np.array([0.0, 0.2, 0.4, 0.6])
    svg = (svgplot.histogram(np.array([3, 5, 2]), edges, close, "score", "t") if chart == "histogram" else
           svgplot.line(np.linspace(0, 0.6, 41), np.linspace(30, 0, 41), "threshold", "n", "t", close))
    boxes = label_boxes(svg)
    assert len(boxes) == len(close)
    for i, (l1, r1, y1) in enumerate(boxes):
        for l2, r2, y2 in boxes[i + 1:]:  # side by side, or a full line box (1.2 x font-size 11) apart
            assert r1 <= l2 or r2 <= l1 or abs(y1 - y2) >= 1.2 * 11, (boxes, i)
    assert all(svgplot.LEFT <= left and right <= svgplot.WIDTH - svgplot.RIGHT for left, right, _ in boxes)
    assert all(y <= svgplot.HEIGHT - svgplot.BOTTOM for _, _, y in boxes)  # every row inside the frame
    assert svgplot.marker_rows([(0, 10), (5, 15), (20, 30), (12, 18)]) == [0, 1, 0, 2]
