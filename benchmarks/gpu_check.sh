#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a host without network, from anywhere in the repo:
#
#     bash benchmarks/gpu_check.sh --out $OUT/gpu               # est. 3-5 min on one H200; --total-s caps it (360)
#     bash benchmarks/gpu_check.sh --cpu --tiny --out /tmp/gpu  # seconds, no GPU: what the test suite runs
#
# The host's Python (python3, or $PYTHON) needs torch, transformers, peft, pyarrow, numpy, scikit-learn, pytest,
# pyyaml. What tasks.core.stage needs beyond that (pydantic and its dependencies) is installed, only when the
# import fails, from the wheels in .whl/ (git-ignored) into /tmp/site, with no index. Fill .whl/ beforehand
# on a machine with network, for the host's Python (versions from constraints.txt):
#
#     for p in pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#              typing_extensions==4.16.0; do
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p
#     done
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
IMPORTS="import tasks.curate.extract, tasks.curate.aggregate, tasks.diagnostics.exact, tasks.finetune.train"
if ! "$PY" -c "$IMPORTS" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check.sh: installing .whl/ into /tmp/site (no index)" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl ||
      "$PY" -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in glob.glob('.whl/*.whl')]"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "$IMPORTS" || { echo "gpu_check.sh: the project's modules do not import (above); fill .whl/ (see this file's header)" >&2; exit 2; }
fi
exec "$PY" benchmarks/gpu_check.py "$@"
