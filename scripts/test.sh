#!/usr/bin/env bash
# Create or refresh .venv, install memlm with the dev, data and torch extras (torch==2.13.0 CPU, for the
# Hugging Face cross-checks), run every test except `slow`.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,data,torch]'
export TF_CPP_MIN_LOG_LEVEL=3
export JAX_PLATFORMS=cpu
set +e
.venv/bin/python -m pytest -m "not slow" -n 2 --dist loadfile --durations=25 -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "no tests collected" >&2
  exit 1
fi
exit "$rc"
