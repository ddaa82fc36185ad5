"""From raw worker results to medians, ratios, targets and the table (Markdown, also printed), with no
model loads: pure functions over dicts, covered by tests/test_bench_smoke.py.

Ratios read one way for speed and another for memory:
- time and throughput: a speedup, quantload over the alternative (> 1: quantload is faster);
- bytes (peak RSS, resident weights): quantload / alternative (< 1: quantload uses less).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from .cases import Case, Metric

LEGEND = ("ratio: time and throughput rows are speedups (quantload vs the alternative, > 1 = quantload faster); "
          "byte rows are quantload / alternative (< 1 = quantload uses less). Medians of fresh-process runs. "
          "Kernel bytes moved = bytes read + written, as a share of memcpy's read + write traffic.")


# --- medians ------------------------------------------------------------------------------------------
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summarize(runs: list[dict]) -> dict:
    """Medians of one runner's runs: numbers -> median over the runs that have them, bools -> all(),
    anything else (error strings, token lists) -> the first run's."""
    ok = [r for r in runs if r.get("ok")]
    values: dict[str, list] = {}
    for r in ok:
        for k, v in r.get("metrics", {}).items():
            values.setdefault(k, []).append(v)
    median = {}
    for k, vs in values.items():
        if all(_is_number(v) for v in vs):
            median[k] = statistics.median(vs)
        elif all(isinstance(v, bool) for v in vs):
            median[k] = all(vs)
        else:
            median[k] = vs[0]
    errors = list(dict.fromkeys(r.get("error") or "failed" for r in runs if not r.get("ok")))
    states = {r["src_state"] for r in runs if r.get("src_state")}
    return {"runs": len(runs), "ok": len(ok), "median": median, "errors": errors, "src_states": len(states)}


def lookup(summary: dict | None, key: str):
    """(value, error) for a metric key: the error is the most specific one recorded ("Q4_K.error" for
    "Q4_K.elements_per_s"), else the runner's own."""
    if summary is None:
        return None, "not run"
    m = summary["median"]
    if _is_number(m.get(key)):
        return m[key], None
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        err = m.get(".".join(parts[:i]) + ".error")
        if err:
            return None, err
    if summary["errors"]:
        return None, summary["errors"][0]
    return None, "not measured"


# --- ratios and targets -----------------------------------------------------------------------------
def ratio(metric: Metric, ql, alt) -> float | None:
    if not (_is_number(ql) and _is_number(alt)) or ql <= 0 or alt <= 0:
        return None
    if metric.unit == "s":
        return alt / ql           # speedup
    return ql / alt               # throughput: speedup; bytes: fraction of the alternative


def met(metric: Metric, r: float | None) -> bool | None:
    if metric.target is None or r is None:
        return None
    if metric.unit == "bytes":
        return r <= metric.target * (1 + 1e-9)
    return r >= metric.target


# --- formatting ---------------------------------------------------------------------------------------
def fmt_value(metric: Metric, v, *, memcpy_traffic: float | None = None) -> str:
    if metric.unit == "s":
        return f"{v:.2f} s"
    if metric.unit == "bytes":
        return f"{v / 2**20:.1f} MiB" if v < 10 * 2**20 else f"{v / 2**20:.0f} MiB"
    if metric.unit == "gb_per_s":
        text = f"{v:.2f} GB/s"
        if memcpy_traffic and metric.key.endswith(".gb_per_s"):
            share = v / memcpy_traffic
            text += f" ({share:.0%} of memcpy)" if share >= 0.095 else f" ({share:.1%} of memcpy)"
        return text
    if metric.key.startswith("tokens"):
        return f"{v:.1f} tok/s"
    return f"{v / 1e9:.2f} G/s" if v >= 1e9 else f"{v / 1e6:.0f} M/s"


def _short(err: str, n: int = 90) -> str:
    err = " ".join(str(err).split())
    return err if len(err) <= n else err[:n - 1] + "…"


@dataclass
class Row:
    case: str
    title: str
    metric: str
    quantload: str
    alternative: str
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)
    quantload_value: float | None = None
    alternative_value: float | None = None
    unit: str = ""
    target_value: float | None = None


def _side_text(metric, status, summary, key, memcpy_traffic):
    """(text, value) for one side's cell: its median, or why there is none."""
    if status["state"] != "ran":
        return status["reason"], None
    v, err = lookup(summary, key)
    if v is None:
        return ("not measured" if err == "not measured" else f"error: {_short(err)}"), None
    text = fmt_value(metric, v, memcpy_traffic=memcpy_traffic)
    if metric.key == "peak_rss":
        imp, _ = lookup(summary, "import_rss")
        if imp is not None:
            text += f" (imports {imp / 2**20:.0f})"
    return text, v


def _parts(case: Case, summaries) -> tuple[list[str], list[str]]:
    """(parts with a figure on at least one side, in the order the runners report them; parts without)."""
    seen: dict[str, bool] = {}
    for name in (case.quantload, case.alternative):
        for k, v in (summaries.get(name) or {}).get("median", {}).items():
            if "." in k:
                part = k.split(".", 1)[0]
                seen[part] = seen.get(part, False) or _is_number(v)
    return [p for p, has in seen.items() if has], [p for p, has in seen.items() if not has]


def _token_note(ql_summary, alt_summary) -> str | None:
    a = (ql_summary or {}).get("median", {}).get("tokens")
    b = (alt_summary or {}).get("median", {}).get("tokens")
    if not (isinstance(a, list) and isinstance(b, list)):
        return None
    if a == b:
        return f"same {len(a)} tokens as the alternative"
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"tokens differ from the alternative's from token {k}"


def build_rows(cases: list[Case], summaries: dict[str, dict], status: dict[str, dict],
               labels: dict[str, str] | None = None) -> list[Row]:
    """One row per (case, metric[, part]). `status[runner]` is {"state": "ran"|"skipped"|"unavailable",
    "reason": str}; `summaries[runner]` is summarize(...) of its runs."""
    labels = labels or {}
    mem = summaries.get("machine.memcpy")
    memcpy_traffic = lookup(mem, "traffic_gb_per_s")[0] if mem else None
    rows: list[Row] = []
    for case in cases:
        ql_status = status.get(case.quantload, {"state": "skipped", "reason": "not run"})
        if ql_status["state"] != "ran":
            rows.append(Row(case.name, case.title, "-", f"skipped: {ql_status['reason']}", "", notes=[]))
            continue
        alt_status = (status.get(case.alternative, {"state": "skipped", "reason": "not run"})
                      if case.alternative else {"state": "none", "reason": "-"})
        ql_sum, alt_sum = summaries.get(case.quantload), summaries.get(case.alternative)
        parts, empty = _parts(case, summaries) if case.parts else ([""], [])
        first = len(rows)
        last_text = {"ql": None, "alt": None}
        for part in parts:
            for i, m in enumerate(case.metrics):
                metric = Metric(m.key.format(part=part), m.label, m.unit, m.better, m.target, m.target_text)
                ql_text, ql_v = _side_text(metric, ql_status, ql_sum, metric.key, memcpy_traffic)
                alt_text, alt_v = _side_text(metric, alt_status, alt_sum, metric.key, memcpy_traffic)
                shown = []
                for side, text in (("ql", ql_text), ("alt", alt_text)):   # an error said once per case
                    repeat = text.startswith("error: ") and text == last_text[side]
                    last_text[side] = text
                    shown.append("error (as above)" if repeat else text)
                r = ratio(metric, ql_v, alt_v)
                row = Row(case.name, case.title, f"{part} {m.label}".strip(), shown[0], shown[1], r,
                          metric.target_text, met(metric, r), [], ql_v, alt_v, metric.unit, metric.target)
                if i == 0:
                    row.notes += _first_row_notes(case, part, ql_sum, alt_sum, labels)
                rows.append(row)
        if empty and len(rows) > first:
            rows[first].notes.append("no figure from either side for " + ", ".join(empty))
    return rows


def _first_row_notes(case, part, ql_sum, alt_sum, labels) -> list[str]:
    notes = []
    if case.check:
        v = (ql_sum or {}).get("median", {}).get(case.check.format(part=part))
        if isinstance(v, bool):
            notes.append(f"bit-exact with {case.check_label}" if v else f"NOT equal to {case.check_label}")
    api = (ql_sum or {}).get("median", {}).get("api")
    if isinstance(api, str):
        notes.append(f"quantload: {api}")
    if any(m.key == "tokens_per_s" for m in case.metrics):
        note = _token_note(ql_sum, alt_sum)
        if note:
            notes.append(note)
    for side, s in (("quantload", ql_sum), ("alternative", alt_sum)):
        if s and 0 < s["ok"] < s["runs"]:
            notes.append(f"{side}: {s['ok']}/{s['runs']} runs ok")
    if ql_sum and ql_sum.get("src_states", 0) > 1:
        notes.append(f"quantload's source changed between its runs ({ql_sum['src_states']} versions)")
    return notes


# --- rendering ----------------------------------------------------------------------------------------
def _met_text(v: bool | None) -> str:
    return {True: "met", False: "NOT met", None: ""}[v]


def _esc(s: str) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(rows: list[Row]) -> str:
    lines, last = ["| case | metric | quantload | alternative | ratio | target | met | notes |",
                   "|---|---|---|---|---|---|---|---|"], None
    for r in rows:
        case = "" if r.case == last else f"**{r.case}**"
        last = r.case
        ratio_text = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append("| " + " | ".join(_esc(c) for c in (case, r.metric, r.quantload, r.alternative, ratio_text,
                                                          r.target, _met_text(r.met), "; ".join(r.notes))) + " |")
    return "\n".join(lines)


def targets_summary(rows: list[Row]) -> str:
    with_target = [r for r in rows if r.target]
    met_n = sum(r.met is True for r in with_target)
    not_met = [f"{r.case} {r.metric}" for r in with_target if r.met is False]
    open_n = sum(r.met is None for r in with_target)
    text = f"targets: {met_n} met, {len(not_met)} not met, {open_n} without both figures"
    return text + (" (not met: " + ", ".join(not_met) + ")" if not_met else "")


def failures(summaries: dict[str, dict]) -> list[str]:
    """Every distinct error, in full, per runner: the table shows them shortened."""
    out = []
    for name, s in summaries.items():
        errs = list(s["errors"]) + [v for k, v in s["median"].items() if k.endswith(".error")]
        for e in dict.fromkeys(errs):
            out.append(f"{name}: {_short(e, 400)}")
    return out


def markdown_report(rows: list[Row], meta: dict, cases: list[Case]) -> str:
    out = ["# quantload bench", ""]
    out.append(f"{meta.get('date', '')} · {meta.get('machine', '')} · repeats: {meta.get('repeats', '')}"
               + f" · threads: {meta.get('threads', 'default')}" + (" · --quick" if meta.get("quick") else "")
               + (f" · commit {meta['commit']}" if meta.get("commit") else ""))
    versions = meta.get("versions") or {}
    if versions:
        out.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out += ["", markdown_table(rows), "", LEGEND, "", targets_summary(rows), ""]
    titles = [f"- **{c.name}**: {c.title}" for c in cases]
    out += ["cases:"] + titles + [""]
    for title, items in (("notes", meta.get("notes")), ("errors", meta.get("errors"))):
        if items:
            out += [f"{title}:"] + [f"- {_esc(n)}" for n in items] + [""]
    return "\n".join(out)


def rows_as_json(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
