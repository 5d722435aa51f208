#!/usr/bin/env bash
# Install molgen with its test extras into .venv and run lint + tests (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh lm,hf,cg,crystal,chgnet,atomica,test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# one pytest-xdist worker per core
.venv/bin/python -m pytest -q -m "not slow" -n auto "$@"
