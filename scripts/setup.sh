#!/usr/bin/env bash
# Set up GRACE-curate from nothing: a virtual environment in .venv with torch, the project and
# its pinned dependencies. Idempotent: a second run only checks what is there.
#   GRACE_TORCH_SPEC  the torch requirement to install first (default: torch==2.13.0, the CPU
#                     build; on a GPU host set it to the CUDA build you want, or to "skip" to keep
#                     the torch already in the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
torch_spec=${GRACE_TORCH_SPEC:-torch==2.13.0}
# torch first, on its own: a later "torch>=2.2" range then installs nothing more, so the
# project never drags in a multi-GB CUDA build behind the user's back.
if [ "$torch_spec" != "skip" ]; then
  python -m pip install --quiet "$torch_spec"
fi
# constraints.txt pins the versions this project is tested with (pip freeze of a green run).
python -m pip install --quiet -c constraints.txt -e ".[dev]"
python -c "import torch, transformers, prefect, dvc, polars, great_expectations; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__, 'prefect', prefect.__version__)"
