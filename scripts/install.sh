#!/usr/bin/env bash
# Create .venv (Python 3.11) if missing and install molgen editable with the given extras.
#   scripts/install.sh lm,hf,test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${1:-lm}]"
