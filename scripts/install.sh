#!/usr/bin/env bash
# Create .venv (Python 3.11) if missing and install molgen editable with the given extras.
#   scripts/install.sh lm,hf,test
#   PYTHON=python3.11 scripts/install.sh lm      # when python3 is not Python 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# molgen needs Python 3.11: the pinned JAX 0.10.x stack (jax, jaxlib, flax, orbax, grain) is
# installed and tested together on 3.11 only.
need_311() {  # $1: interpreter, $2: what it is (for the message)
  local version
  version=$("$1" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])' 2>/dev/null) || version="not runnable"
  if [ "$version" != "Python 3.11" ]; then
    echo "error: $2 '$1' is $version; molgen needs Python 3.11 (JAX 0.10.x pins)." >&2
    echo "Point PYTHON at a Python 3.11 interpreter, e.g. PYTHON=python3.11 bash scripts/install.sh ${EXTRAS}" >&2
    echo "or PYTHON=/path/to/bin/python3.11 (pyenv, conda, uv python install 3.11 all provide one)." >&2
    exit 1
  fi
}

EXTRAS=${1:-lm}
if [ -x .venv/bin/python ]; then
  need_311 .venv/bin/python "the existing .venv's interpreter (remove .venv to rebuild it)"
else
  need_311 "$PY" "the interpreter (\$PYTHON, default python3)"
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${EXTRAS}]"
