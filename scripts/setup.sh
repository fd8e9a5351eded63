#!/usr/bin/env bash
# Create a venv beside the project and install attnswap with its test tools. Idempotent and quiet.
#   scripts/setup.sh            .venv from constraints.txt: the exact versions the suite last passed with
#   scripts/setup.sh --newest   .venv-newest with the newest versions pyproject's ranges admit (re-resolved each run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.venv
if [ "${1:-}" = "--newest" ]; then venv=.venv-newest; fi
quiet() { "$@" 2>&1 | { grep -v -i -E "warning|^\s*$" || true; }; return "${PIPESTATUS[0]}"; }
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if [ "$venv" = .venv-newest ]; then
  # torch is kept within pyproject's range by the range itself; the newest CPU wheel this machine offers is taken.
  quiet "${pip[@]}" --upgrade pip setuptools
  quiet "${pip[@]}" --upgrade --upgrade-strategy eager --no-build-isolation -e ".[test]"
else
  stamp=$venv/.attnswap-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    # The build tools first, at their locked versions, so that the editable build below uses them (no isolation).
    quiet "${pip[@]}" -c constraints.txt pip setuptools
    quiet "${pip[@]}" -c constraints.txt --no-build-isolation -e ".[test]"
    touch "$stamp"
  fi
fi
"$venv/bin/python" -c "import attnswap, torch, transformers" \
  || { echo "error: installing attnswap into $venv failed; delete $venv and run scripts/setup.sh again" >&2; exit 2; }
