"""One measurement in this (fresh) process: `python -m bench.worker RUNNER` or `... input:NAME`.

Prints exactly one line starting with MARKER followed by JSON: {"ok": true, "metrics": {...}} or
{"ok": false, "error": "..."}. Everything else the libraries print goes to stdout/stderr unparsed.
Imports nothing heavy itself, so a runner's import baseline is its own.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

MARKER = "BENCH_RESULT "

#: Installed for quantload's own tests, needed by no bench case, and imported by transformers whenever
#: present (transformers.cache_utils imports hqq, which pulls in torch._inductor: ~80 MiB of resident
#: memory in both processes). Hidden from every worker, both sides alike, so each side's figures are those
#: of an environment holding what its case needs (set QUANTLOAD_BENCH_KEEP_OPTIONAL=1 to keep them).
UNRELATED_OPTIONAL = ("hqq",)


def hide_unrelated_optional() -> list[str]:
    if os.environ.get("QUANTLOAD_BENCH_KEEP_OPTIONAL"):
        return []
    for name in UNRELATED_OPTIONAL:
        sys.modules[name] = None  # importlib.util.find_spec(name) is then None: "not installed"
    return list(UNRELATED_OPTIONAL)


def run(name: str) -> dict:
    if name.startswith("input:"):
        from . import inputs
        return inputs.BUILDERS[name.split(":", 1)[1]]()
    from .cases import RUNNERS
    module, fn, *args = RUNNERS[name].fn.split(":")   # "module:function[:argument]"
    return getattr(importlib.import_module(f"bench.{module}"), fn)(*args)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.worker RUNNER | input:NAME", file=sys.stderr)
        return 2
    hidden = hide_unrelated_optional()
    try:
        result = {"ok": True, "metrics": run(argv[0])}
        if hidden:
            result["metrics"]["hidden_packages"] = hidden
    except BaseException as e:  # the harness shows the error in the case's row
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(MARKER + json.dumps(result, default=str), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
