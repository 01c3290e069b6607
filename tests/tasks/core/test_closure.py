"""closure: the project modules a module imports, transitively, read from its import statements."""

from __future__ import annotations

import tasks.core.closure as closure_module
from tasks.core.closure import ROOT, import_closure, relative_closure


def test_fine_tune_runs_key_covers_the_batching_it_uses():
    """The drift issue 11 found: pack_batches (now tasks/core/artifacts.py) decides every training batch."""
    files = relative_closure(ROOT / "tasks" / "finetune" / "runs.py")
    assert {"tasks/finetune/runs.py", "tasks/finetune/train.py", "tasks/core/artifacts.py", "tasks/finetune/evaluate.py",
            "tasks/curate/answers.py", "tasks/finetune/trunk.py"} <= set(files)
    assert all(f.startswith(("tasks/", "flows/")) for f in files)  # third-party imports are not followed
    from tasks.finetune.runs import CODE
    assert [p.relative_to(ROOT).as_posix() for p in CODE] == files


def test_stages_that_only_read_extract_do_not_import_the_model_code():
    """score, aggregate and cluster read extract's numbers: a change to the model code must not re-run them."""
    for stage in ("score", "aggregate", "cluster"):
        files = set(relative_closure(ROOT / "tasks" / "curate" / f"{stage}.py"))
        torch_side = {f"tasks/{m}.py" for m in ("curate/extract", "curate/proxy", "curate/projected",
                                                 "curate/unconditional", "diagnostics/exact")}
        assert not files & torch_side, (stage, sorted(files & torch_side))


def test_lazy_relative_and_from_package_imports_are_followed(tmp_path, monkeypatch):
    package = tmp_path / "tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tasks import b\n\ndef f():\n    from .c import g\n    return g\n")
    (package / "b.py").write_text("import numpy\nimport tasks.d\n")
    (package / "c.py").write_text("g = 1\n")
    (package / "d.py").write_text("import json\n")
    (package / "unused.py").write_text("")
    monkeypatch.setattr(closure_module, "ROOT", tmp_path)
    import_closure.cache_clear()
    try:
        assert [p.name for p in import_closure(package / "a.py")] == ["a.py", "b.py", "c.py", "d.py"]
        (package / "d.py").write_text("import tasks.unused\n")
        import_closure.cache_clear()
        assert "unused.py" in [p.name for p in import_closure(package / "a.py")]  # a new import is seen
    finally:
        import_closure.cache_clear()


def test_every_dvc_stage_lists_the_modules_its_command_imports():
    """A stage missing a module it imports would serve stale outputs after that module changes."""
    import re

    import yaml

    checked = 0
    for pipeline in ("dvc.yaml", "finetune/dvc.yaml", "diagnostics/dvc.yaml"):
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text(encoding="utf-8"))["stages"].items():
            module = re.search(r"python -m (tasks(?:\.\w+)+)", stage["cmd"]).group(1)
            needed = set(relative_closure(ROOT / (module.replace(".", "/") + ".py")))
            listed = {dep for dep in stage.get("deps", []) if dep.endswith(".py")}
            assert listed == needed, (f"{pipeline}:{name} lists {sorted(listed - needed)} it does not import and "
                                      f"misses {sorted(needed - listed)}")
            checked += 1
    assert checked >= 20
