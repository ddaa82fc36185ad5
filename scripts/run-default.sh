#!/usr/bin/env bash
# Set up (if needed), then load the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF, kept
# quantized) and generate text with its chat template, on the packed kernels (QUANTLOAD_FAST_KERNELS=1:
# the fast path, whether or not it is already the default) and quantload's greedy loop, on all physical
# cores. It prints the decode rate (tokens/s after the prompt's forward, which also repacks the weights).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export QUANTLOAD_FAST_KERNELS="${QUANTLOAD_FAST_KERNELS:-1}"
exec quantload generate --chat --prompt "${1:-What is the capital of France? Answer in one sentence.}" --max-new-tokens "${2:-40}"
