#!/usr/bin/env bash
# Install molgen into .venv and run the quickstart experiment (the README's first command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh lm
.venv/bin/python -m molgen.main --config=experiments/lm_quickstart.py --workdir="${1:-runs/lm_quickstart}"
