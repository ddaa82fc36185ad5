"""One measurement in this (fresh) process: `python -m bench.worker RUNNER` or `... input:NAME`.

Prints exactly one line starting with MARKER followed by JSON: {"ok": true, "metrics": {...}} or
{"ok": false, "error": "..."}. Everything else the libraries print goes to stdout/stderr unparsed.
Imports nothing heavy itself, so a runner's import baseline is its own.
"""
from __future__ import annotations

import importlib
import json
import sys
import traceback

MARKER = "BENCH_RESULT "


def run(name: str) -> dict:
    if name.startswith("input:"):
        from . import inputs
        return inputs.BUILDERS[name.split(":", 1)[1]]()
    from .cases import RUNNERS
    module, fn = RUNNERS[name].fn.split(":")
    return getattr(importlib.import_module(f"bench.{module}"), fn)()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.worker RUNNER | input:NAME", file=sys.stderr)
        return 2
    try:
        result = {"ok": True, "metrics": run(argv[0])}
    except BaseException as e:  # the harness shows the error in the case's row
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(MARKER + json.dumps(result, default=str), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
