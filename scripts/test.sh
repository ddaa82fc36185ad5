#!/usr/bin/env bash
# Set up (if needed), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
