"""Rewrite the `.py` deps of every stage in the three dvc.yaml files to its module's import closure.

    python scripts/sync_deps.py          # rewrite in place, print what changed
    python scripts/sync_deps.py --check  # exit 1 if any stage's list differs (tests/tasks/core/test_closure.py checks the same)

The deps of a stage are code as much as data: a module the stage imports, changed, must re-run it.
The list follows from the imports (tasks/core/closure.py), so it is written by this script and never by hand;
comments, data deps and the order of everything else in the file are kept as they are.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.core.closure import relative_closure  # noqa: E402

PIPELINES = ("dvc.yaml", "finetune/dvc.yaml", "diagnostics/dvc.yaml")
STAGE = re.compile(r"^  (\w+):\s*(#.*)?$")
CMD = re.compile(r"python -m (tasks(?:\.\w+)+)")
CODE_DEP = re.compile(r"^      - (tasks|flows)/\S+\.py\s*$")


def sync(text: str) -> str:
    """The pipeline file with each stage's code deps replaced by its module's closure."""
    lines, out = text.splitlines(keepends=True), []
    module, in_deps, inserted = None, False, False
    for line in lines:
        if STAGE.match(line):  # a new stage: its module is the one its cmd names
            module, in_deps, inserted = None, False, False
        elif module is None and (cmd := CMD.search(line)):
            module = cmd.group(1)
        if line.strip() == "deps:":
            in_deps = True
        elif in_deps and not line.startswith("      - "):
            in_deps = False
        if in_deps and CODE_DEP.match(line):
            if not inserted:  # the whole closure where the first code dep stood
                out.extend(f"      - {path}\n" for path in relative_closure(ROOT / (module.replace(".", "/") + ".py")))
                inserted = True
            continue
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 on a difference")
    args = parser.parse_args(argv)
    differ = []
    for pipeline in PIPELINES:
        path = ROOT / pipeline
        text = path.read_text(encoding="utf-8")
        new = sync(text)
        if new != text:
            differ.append(pipeline)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    print(("differ: " if args.check else "rewritten: ") + (", ".join(differ) or "none"))
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
