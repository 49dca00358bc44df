#!/usr/bin/env bash
# Creates the project's virtual environment with the given extras, pinned by the lock file.
# Usage: infra/setup.sh [VENV_DIR] [EXTRAS]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
extras=${2:-preprocess,train,pipelines,serve,dev}
py=${PYTHON:-}
if [ -z "$py" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      py=$cand; break
    fi
  done
fi
[ -n "$py" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# pip's own output (deprecation and index-config warnings included) goes to a log; the
# terminal gets one line, or the log's tail when the install fails.
log="$venv/setup.log"
echo "setup: installing into $venv (extras: $extras; pip log: $log; ~3 min on a fresh machine)"
if ! { "$venv/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel &&
       "$venv/bin/python" -m pip install -q -c requirements/constraints.txt -e ".[${extras}]"; } \
     >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "setup: pip install failed (full log: $log)" >&2
  exit 1
fi
echo "setup: $venv ready ($("$venv/bin/python" --version); extras: $extras)"
