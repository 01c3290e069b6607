"""GRACE-curate's stage code, in packages that show the pipelines (the tree: docs/layout.md).

    core         the stage contract (stage.py), record schemas, progress, import closure, and the
                 readers and batching every pipeline shares (artifacts.py)
    curate       the default pipeline, dvc.yaml: ingest -> segment -> model -> extract -> score ->
                 cluster -> aggregate -> select -> validate -> export -> report, and its helpers
    diagnostics  diagnostics/dvc.yaml: fidelity of the proxy, label-based diagnostics
    finetune     finetune/dvc.yaml: the fine-tune-and-evaluate table and its warm-up scorer
    tools        the `grace` command line and `grace diff`

Which package may import which is written here once, as data, and tests/tasks/test_layout.py
checks every import statement of tasks/ and flows/ against it (and that no import cycle exists):
core imports nothing of ours; curate imports core; diagnostics and finetune import curate and
core; tools and flows may import anything; nothing imports diagnostics, finetune or tools but
themselves, tools and flows. A module that two packages need lives in the lower one (core).
"""

ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "curate": frozenset({"core", "curate"}),
    "diagnostics": frozenset({"core", "curate", "diagnostics"}),
    "finetune": frozenset({"core", "curate", "finetune"}),
    "tools": frozenset({"core", "curate", "diagnostics", "finetune", "tools"}),
    "flows": frozenset({"core", "curate", "diagnostics", "finetune", "tools", "flows"}),
}
