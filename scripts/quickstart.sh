#!/usr/bin/env bash
# Install molgen into .venv and run the quickstart experiment (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[lm]'
.venv/bin/python -m molgen.main --config=experiments/lm_quickstart.py --workdir="${1:-runs/lm_quickstart}"
