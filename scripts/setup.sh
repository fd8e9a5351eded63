#!/usr/bin/env bash
# Create .venv beside the project and install attnswap with its test tools. Idempotent and quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.attnswap-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
  # torch first and pinned: a range would pull the newest CUDA build; 2.13.0 is the CPU wheel the
  # project is tested with (any 2.11-2.13 already installed is kept).
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v -i warning || true
  .venv/bin/python -c "import attnswap, torch, transformers" || { echo "error: installing attnswap failed" >&2; exit 2; }
  touch "$stamp"
fi
