"""The bench harness: `python -m bench` (from the repository root).

Runs every case's quantload runner and its alternative alternately, each in a fresh process, several
times; prints a table of medians and ratios and writes it as bench/results/latest.{json,md,png}.
The alternatives (transformers' GGUF loader, bitsandbytes, gguf-py) are optional: whatever is not
installed is reported as such and quantload's figures are shown alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

from . import chart, inputs, report
from .cases import ALL_CASES_BY_NAME, ALTERNATIVE, CASES, CASES_BY_NAME, RUNNERS, SCALE_CASES, SCALE_SIZES, runners_of
from .worker import MARKER

ROOT = inputs.BENCH_DIR.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per side (default 3)")
    p.add_argument("--quick", action="store_true", help="1 repeat, and skip the slow alternatives")
    p.add_argument("--only", action="append", default=[], metavar="CASE",
                   help="run only these cases (repeatable or comma-separated); --list shows them")
    p.add_argument("--no-alternatives", action="store_true", help="measure quantload alone")
    p.add_argument("--gemma-gguf", metavar="PATH",
                   help=f"a gemma-3-270m Q4_K_M GGUF for gguf_load_gemma (or set {inputs.GEMMA_ENV})")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for every worker, both sides (OMP_NUM_THREADS/MKL_NUM_THREADS); default: the "
                        "libraries' own choice. On a busy shared machine, 1 avoids stalls of oversubscribed threads")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process (default 1200)")
    p.add_argument("--out", default=str(inputs.RESULTS_DIR), help="where latest.{json,md,png} go")
    p.add_argument("--scale", default="", metavar="SIZES",
                   help="also run the scale series for these synthetic llama sizes (comma-separated: "
                        f"{', '.join(SCALE_SIZES)}); heavy: a 7B checkpoint is 14 GB of disk, written once")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--render", metavar="JSON", help="rebuild the outputs from a saved latest.json (no runs)")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 1
    a.only = [n for item in a.only for n in item.split(",") if n]
    unknown = [n for n in a.only if n not in CASES_BY_NAME]
    if unknown:
        p.error(f"unknown case(s) {unknown}; cases: {', '.join(CASES_BY_NAME)}")
    a.scale = [n for n in a.scale.split(",") if n]
    if [n for n in a.scale if n not in SCALE_SIZES]:
        p.error(f"unknown --scale size(s) {a.scale}; sizes: {', '.join(SCALE_SIZES)}")
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


# --- which runners run --------------------------------------------------------------------------------
def runner_status(cases, args, *, installed=inputs.installed) -> dict[str, dict]:
    status = {}
    for case in cases:
        for name in runners_of(case):
            r = RUNNERS[name]
            missing = [m for m in r.requires if not installed(m)]
            if r.needs_gemma and not os.environ.get(inputs.GEMMA_ENV):
                st = ("skipped", f"no gemma-3-270m GGUF here: {inputs.GEMMA_INSTALL}, or pass --gemma-gguf PATH or "
                             f"set {inputs.GEMMA_ENV}")
            elif r.side == ALTERNATIVE and args.no_alternatives:
                st = ("skipped", "skipped (--no-alternatives)")
            elif missing:
                st = ("unavailable", "not installed: pip install " + " ".join(missing))
            elif r.slow and args.quick:
                st = ("skipped", "skipped by --quick (slow alternative)")
            else:
                st = ("ran", "")
            status[name] = {"state": st[0], "reason": st[1]}
    return status


def schedule(cases, status, repeats: int) -> list[tuple[int, str]]:
    """(repeat, runner) in run order: per repeat, each case's two sides back to back, the order flipped
    every repeat so neither side always runs on a warmer machine; a shared runner runs once per repeat."""
    order = []
    for rep in range(repeats):
        done = set()
        for case in cases:
            pair = runners_of(case)
            for name in (pair if rep % 2 == 0 else pair[::-1]):
                if status[name]["state"] == "ran" and name not in done:
                    done.add(name)
                    order.append((rep, name))
    return order


# --- processes ----------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    threads = os.environ.get("QUANTLOAD_BENCH_THREADS")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(name: str, timeout: float) -> dict:
    """One fresh `python -m bench.worker NAME`: its result line, or why there is none."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "bench.worker", name], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    result = None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER):])
            break
    if result is None:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"ok": False, "error": f"worker exited with {p.returncode} and no result: {last}"}
    result["wall_s"] = time.perf_counter() - t0
    if not result["ok"]:
        result["stderr_tail"] = p.stderr[-3000:]
    return result


def build_inputs(status: dict, timeout: float, log) -> dict[str, dict]:
    """Build the cached checkpoints the runners that will run need; a failed input marks its runners
    unavailable (their rows show why)."""
    needed = {n for name, st in status.items() if st["state"] == "ran" for n in RUNNERS[name].needs}
    built = {}
    for name in [n for n in inputs.BUILDERS if n in needed]:     # bf16 before nf4
        if not inputs.ready(name):
            log(f"building input {name} (once, then cached) ...")
        res = run_worker(f"input:{name}", timeout)
        built[name] = res
        if not res["ok"]:
            log(f"input {name} failed: {res['error']}")
            for runner, st in status.items():
                if name in RUNNERS[runner].needs and st["state"] == "ran":
                    st.update(state="unavailable", reason=f"input {name} could not be built: {res['error']}")
    return built


def warm_page_cache(paths) -> None:
    """Read every input file once so the first measured run does not pay for a cold disk."""
    for p in paths:
        p = pathlib.Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


# --- description of the run ------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("quantload", "torch", "transformers", "bitsandbytes", "gguf", "numpy", "safetensors", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + (" (src/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def src_state() -> str:
    """A short fingerprint of quantload's source (HEAD + uncommitted changes under src/): other work may
    change the library while a long bench runs, and the report says so."""
    import hashlib
    h = hashlib.sha1()
    try:
        for cmd in (["git", "rev-parse", "HEAD"], ["git", "diff", "HEAD", "--", "src"],
                    ["git", "ls-files", "--others", "--exclude-standard", "-s", "--", "src"]):
            h.update(subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return h.hexdigest()[:10]


def _brief(metrics: dict) -> str:
    keys = [("seconds", "{:.2f} s"), ("peak_rss", None), ("tokens_per_s", "{:.1f} tok/s"),
            ("tokens_prefill_per_s", "prefill {:.1f} tok/s"),
            ("copy_gb_per_s", "{:.2f} GB/s")]
    parts = []
    for k, f in keys:
        v = metrics.get(k)
        if v is not None:
            parts.append(f"peak RSS {v / 2**20:.0f} MiB" if k == "peak_rss" else f.format(v))
    errs = [k for k in metrics if k.endswith(".error")]
    if not parts:
        parts.append(f"{len(metrics) - len(errs)} figures")
    if errs:
        parts.append(f"{len(errs)} errors")
    return ", ".join(parts)


# --- main ---------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(args, cases) -> tuple[dict, dict, dict, dict]:
    """Build the inputs, then run the schedule: (status, runs per runner, inputs built, meta)."""
    gemma_note = None
    if args.gemma_gguf:
        os.environ[inputs.GEMMA_ENV] = os.path.abspath(args.gemma_gguf)
    elif not os.environ.get(inputs.GEMMA_ENV) and any(RUNNERS[r].needs_gemma for c in cases for r in runners_of(c)):
        try:   # the chunk packages scripts/setup.sh installs, concatenated once into .cache/
            os.environ[inputs.GEMMA_ENV] = str(inputs.find_gemma_gguf())
        except (OSError, ValueError) as e:
            gemma_note = f"gemma-3-270m GGUF: {e}"
    if args.threads:
        os.environ["QUANTLOAD_BENCH_THREADS"] = str(args.threads)
    load_before = os.getloadavg()[0]
    status = runner_status(cases, args)
    built = build_inputs(status, args.timeout, _log)
    notes = [f"input {n}: {r['metrics']['made_by']}" for n, r in built.items() if r["ok"]]
    if gemma_note:
        notes.append(gemma_note)
    try:
        warm_page_cache([inputs.smollm2_gguf(), inputs.bf16_dir(), inputs.nf4_dir(), inputs.q4_k_gguf(),
                         *([inputs.gemma_gguf()] if inputs.gemma_gguf() else [])])
    except OSError as e:
        notes.append(f"page cache not warmed: {e}")
    runs: dict[str, list] = {name: [] for name in status}
    plan = schedule(cases, status, args.repeats)
    started = time.perf_counter()
    for i, (rep, name) in enumerate(plan, 1):
        state = src_state()
        res = run_worker(name, args.timeout)
        res["src_state"] = state
        runs[name].append(res)
        brief = _brief(res.get("metrics", {})) if res["ok"] else "error: " + report._short(res["error"], 120)
        _log(f"[{i}/{len(plan)} repeat {rep + 1}] {name:22} {brief} ({res['wall_s']:.0f} s)")
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
            "repeats": args.repeats, "quick": args.quick, "commit": _git_commit(), "versions": _versions(),
            "command": "python -m bench " + " ".join(args.argv), "total_s": round(time.perf_counter() - started, 1),
            "threads": args.threads or "default", "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "notes": notes}
    if not os.environ.get("QUANTLOAD_BENCH_KEEP_OPTIONAL"):
        from .worker import UNRELATED_OPTIONAL
        notes.append(f"hidden from every worker, both sides: {', '.join(UNRELATED_OPTIONAL)} (installed for "
                     "quantload's tests, used by no case, imported by transformers when present)")
    if max(meta["load_average"]) > (os.cpu_count() or 1):
        notes.append(f"the machine was busy (load average {meta['load_average'][0]} at the start, "
                     f"{meta['load_average'][1]} at the end, on {os.cpu_count()} CPUs): figures are noisy"
                     + ("" if args.threads else "; --threads 1 avoids stalls of oversubscribed threads"))
    return status, runs, built, meta


def write_outputs(out: pathlib.Path, cases, status, runs, built, meta) -> str:
    """Medians, rows, then latest.md / latest.json / latest.png in `out`; returns the Markdown."""
    summaries = {name: report.summarize(r) for name, r in runs.items() if r}
    rows = report.build_rows(cases, summaries, status, {n: RUNNERS[n].label for n in status})
    meta = {**meta, "notes": list(meta.get("notes", [])), "errors": report.failures(summaries)}
    out.mkdir(parents=True, exist_ok=True)
    chart_note = chart.draw(rows, str(out / "latest.png"))
    if chart_note:
        meta["notes"].append(chart_note)
    md = report.markdown_report(rows, meta, cases)
    (out / "latest.md").write_text(md)
    payload = {"meta": meta, "cases": [c.name for c in cases], "rows": report.rows_as_json(rows),
               "runners": {n: {"label": RUNNERS[n].label, "side": RUNNERS[n].side, **status[n],
                               "summary": summaries.get(n), "runs": runs.get(n, [])} for n in status},
               "inputs": built}
    (out / "latest.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    _log(f"wrote {out / 'latest.md'}, {out / 'latest.json'}" + ("" if chart_note else f", {out / 'latest.png'}"))
    return md


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.list:
        for c in CASES:
            print(f"{c.name:24} {c.title}")
        for size, cs in SCALE_CASES.items():
            for c in cs:
                print(f"{c.name:24} {c.title} (--scale {size})")
        return 0
    if args.render:   # redo the table, JSON and chart from a saved run: no measurement
        saved = json.loads(pathlib.Path(args.render).read_text())
        cases = [ALL_CASES_BY_NAME[n] for n in saved["cases"] if n in ALL_CASES_BY_NAME]
        status = {n: {"state": r["state"], "reason": r["reason"]} for n, r in saved["runners"].items()}
        runs = {n: r["runs"] for n, r in saved["runners"].items()}
        print(write_outputs(pathlib.Path(args.out), cases, status, runs, saved.get("inputs", {}), saved["meta"]))
        return 0
    cases = [CASES_BY_NAME[n] for n in args.only] if args.only else list(CASES)
    if args.scale:   # --scale alone runs the series alone; with --only, beside those cases
        cases = (cases if args.only else []) + [c for size in args.scale for c in SCALE_CASES[size]]
    if any(m.key.endswith(".gb_per_s") for c in cases for m in c.metrics) and CASES_BY_NAME["memcpy"] not in cases:
        cases.insert(0, CASES_BY_NAME["memcpy"])   # kernels' bytes moved are read against memcpy
    print(write_outputs(pathlib.Path(args.out), cases, *measure(args, cases)))
    return 0
