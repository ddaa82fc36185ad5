"""What every tests/test_fuzz_*.py shares: the time budget, the per-case bounds, byte mutations.

The property every parser must hold: a mutated input gives a valid result or a QuantloadError, never
another exception, never a hang (each case runs under a SIGALRM timer), never a large allocation
(tracemalloc peak for Python/numpy memory, the process's peak RSS for everything else).

Budget: QUANTLOAD_FUZZ_SECONDS per fuzz test (default 6: the seven parsers' tests stay under a minute in
CI); raise it locally for a longer run. Examples are derandomized (the same in every run) unless
QUANTLOAD_FUZZ_RANDOM=1. Once a test's budget is spent its remaining examples return at once.
"""
from __future__ import annotations

import os
import resource
import signal
import struct
import time
import tracemalloc

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from quantload.errors import QuantloadError

FUZZ_SECONDS = float(os.environ.get("QUANTLOAD_FUZZ_SECONDS", "6"))
CASE_LIMIT_S = 3.0                  # one parse of a few-KiB input taking this long is a hang
TRACED_PEAK_LIMIT = 32 << 20        # Python/numpy bytes one case may allocate
RSS_GROWTH_LIMIT = 512 << 20        # growth of the process's peak RSS one case may cause


def fuzz_settings(max_examples: int = 1_000_000):
    return settings(max_examples=max_examples, deadline=None,
                    derandomize=os.environ.get("QUANTLOAD_FUZZ_RANDOM") != "1", database=None,
                    suppress_health_check=list(HealthCheck))


class BudgetSpent(BaseException):
    """Raised from inside a @given test to end it: hypothesis lets BaseExceptions through at once,
    where returning early would still generate every remaining example."""


class Budget:
    """Counts cases and outcomes of one fuzz test; `tick()` ends the test once its seconds are spent."""

    def __init__(self, name: str, seconds: float = FUZZ_SECONDS):
        self.name, self.seconds = name, seconds
        self.started: float | None = None
        self.cases = self.valid = self.refused = 0

    def tick(self) -> None:
        if self.started is None:
            self.started = time.monotonic()
        if time.monotonic() - self.started >= self.seconds:
            raise BudgetSpent

    def summary(self) -> str:
        return f"{self.name}: {self.cases} cases, {self.valid} valid, {self.refused} QuantloadError"


def run_fuzz(budget: Budget, given_test, *, min_cases: int = 20, need_valid: bool = True,
             need_refused: bool = True) -> None:
    """Run a @given test until its budget is spent (or hypothesis runs out of examples), then check
    it really exercised the parser: enough cases, some accepted and some refused."""
    try:
        given_test()
    except BudgetSpent:
        pass
    print(budget.summary())
    assert budget.cases >= min_cases, budget.summary()
    assert budget.valid > 0 or not need_valid, budget.summary()
    assert budget.refused > 0 or not need_refused, budget.summary()


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a case ran past {CASE_LIMIT_S} s")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(budget: Budget, fn) -> object:
    """fn() under the time and memory bounds. Returns its result, or the QuantloadError it raised;
    anything else (another exception, a hang, a big allocation) fails the test."""
    budget.cases += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    rss0 = _peak_rss()
    tracemalloc.start()
    try:
        try:
            result = fn()
        except QuantloadError as e:
            budget.refused += 1
            result = e
        else:
            budget.valid += 1
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < TRACED_PEAK_LIMIT, f"one case traced {peak} bytes"
    assert _peak_rss() - rss0 < RSS_GROWTH_LIMIT, f"one case grew the peak RSS by {_peak_rss() - rss0} bytes"
    return result


# --- byte-level mutations (the GGUF fuzzer's set) ------------------------------------------------------
_U64_LIES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 32]
_U32_LIES = [0, 1, 3, 4, 5, 8, 9, 12, 13, 31, 43, 2**16, 2**31, 2**32 - 1]
_position = st.integers(0, 1 << 14)
byte_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("byte"), _position, st.sampled_from(b'{}[]",:0-9e.\\"\0\xff') | st.integers(0, 255)),
    st.tuples(st.just("u64"), _position, st.sampled_from(_U64_LIES) | st.integers(0, 2**64 - 1)),
    st.tuples(st.just("u32"), _position, st.sampled_from(_U32_LIES) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("digits"), _position, st.sampled_from([b"-1", b"0", b"1e308", b"99999999999999999999",
                                                             b"1.5", b"null", b"true", b"[]", b"{}"])),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("delete"), _position, st.integers(1, 40)),
    st.tuples(st.just("splice"), _position, _position, st.integers(1, 64)),
)
byte_mutations = st.lists(byte_mutation, min_size=1, max_size=4)


def mutate(data: bytes, mutations, start: int = 0, end: int | None = None) -> bytes:
    """Apply mutations at positions inside [start, end) (the whole input by default)."""
    buf = bytearray(data)
    for m in mutations:
        hi = len(buf) if end is None else min(end, len(buf))
        if hi <= start:
            break
        kind, pos = m[0], start + m[1] % (hi - start)
        if kind == "flip":
            buf[pos] ^= 1 << m[2]
        elif kind == "byte":
            buf[pos] = m[2]
        elif kind in ("u64", "u32"):
            packed = struct.pack("<Q" if kind == "u64" else "<I", m[2])
            buf[pos:pos + len(packed)] = packed
        elif kind == "digits":
            buf[pos:pos + len(m[2])] = m[2]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "delete":
            del buf[pos:pos + m[2]]
        else:  # splice: insert a copy of another segment
            src = start + m[2] % (hi - start)
            buf[pos:pos] = buf[src:src + m[3]]
    return bytes(buf)


# --- JSON-level mutations: replace, delete or add values anywhere in a document -----------------------
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.sampled_from([0, -1, 1, 2**31, 2**32 - 1, 2**63, 2**64, 0.5, -0.0, 1e308]),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                        st.sampled_from(["", "F32", "U8", "nf4", "fp4", "float32", "bfloat16", "model.safetensors",
                                         "../x", "/etc/passwd", "int", "re:(", "lm_head", "gptq", "awq"]))
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=8)
json_edit = st.tuples(st.sampled_from(["replace", "delete", "add"]), st.integers(0, 1 << 16),
                      st.text(max_size=8), json_value)
json_edits = st.lists(json_edit, min_size=1, max_size=4)


def _containers(doc, out):
    if isinstance(doc, (dict, list)):
        out.append(doc)
        for v in (doc.values() if isinstance(doc, dict) else doc):
            _containers(v, out)
    return out


def edit_json(doc, edits):
    """doc (already a fresh copy) with each edit applied to one of its objects/arrays; may replace the
    whole document when it is a scalar."""
    for kind, where, new_key, value in edits:
        found = _containers(doc, [])
        if not found:
            return value
        target = found[where % len(found)]
        if isinstance(target, dict):
            keys = list(target)
            if kind == "add" or not keys:
                target[new_key] = value
            elif kind == "delete":
                del target[keys[where % len(keys)]]
            else:
                target[keys[where % len(keys)]] = value
        else:
            if kind == "add" or not target:
                target.append(value)
            elif kind == "delete":
                del target[where % len(target)]
            else:
                target[where % len(target)] = value
    return doc
