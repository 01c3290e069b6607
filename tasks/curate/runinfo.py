"""What shaped a run, as its stages recorded it in outputs/ (not params.yaml, which may have changed since):
the report's settings table and the export's dataset cards read it here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content; {} when the file is absent (an outputs tree from before the file existed)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_settings(outputs: Path) -> list[tuple[str, str]]:
    """(setting, value) rows: what shaped this selection, as the stages recorded it in their outputs
    (not params.yaml, which may have changed since the run)."""
    score, aggregate = read_json(outputs / "score/stats.json"), read_json(outputs / "aggregate/stats.json")
    manifest = read_json(outputs / "select/manifest.json")
    rules = []
    for name, entry in manifest.get("subsets", {}).items():
        if isinstance(entry, dict):
            rules.append(f"{name}: " + (f"top {entry['fraction']:g}" if "fraction" in entry
                                        else f"token budget {entry.get('token_budget')}"))
    how = aggregate.get("how")
    if how == "softmin":
        how = f"softmin (tau {aggregate.get('softmin_tau')})"
    trajectory = score.get("trajectory")
    if trajectory == "ema":
        trajectory = f"ema (beta {score.get('ema_beta')})"
    rows = [("score.method", aggregate.get("method", manifest.get("method"))), ("score.gradient", score.get("gradient")),
            ("score.lambda_", score.get("lambda_")), ("score.trajectory", trajectory),
            ("score.first_step", score.get("first_step")), ("aggregate.how", how),
            ("select (fractions, budgets)", ", ".join(rules) or None), ("select.stratify_by", manifest.get("stratify_by"))]
    return [(name, "not recorded" if value is None else str(value)) for name, value in rows]
