"""The load engine: its worker pool bounded by bytes in flight, and identical results whatever the pool."""
import threading
import time

import pytest
import torch

import quantload
from quantload.engine import _Pipeline, load_workers
from quantload.errors import ConfigError
from quantload.transfer import Staging

from test_pipeline import make_tiny


def test_pipeline_bounds_bytes_in_flight_and_keeps_order():
    running, peak, lock = [0], [0], threading.Lock()

    def job(i, cost):
        with lock:
            running[0] += cost
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (3 - i % 3))  # later jobs may finish first: results must still come in order
        with lock:
            running[0] -= cost
        return i

    pipe = _Pipeline(workers=4, budget=100)
    costs = [40, 40, 40, 10, 90, 150, 5, 5, 60]  # 150 alone exceeds the budget: it runs by itself
    out = []
    try:
        for i, c in enumerate(costs):
            out += pipe.submit(c, job, i, c)
        out += list(pipe.drain())
    finally:
        pipe.close()
    assert out == list(range(len(costs)))
    assert peak[0] <= 150
    assert pipe.in_flight == 0


def test_pipeline_without_threads_runs_in_the_caller():
    seen = []
    pipe = _Pipeline(workers=1, budget=10)
    assert pipe.pool is None
    results = pipe.submit(5, lambda: seen.append(threading.get_ident()) or "a")
    results += pipe.submit(6, lambda: "b")  # over budget: "a" is handed back first
    results += list(pipe.drain())
    assert results == ["a", "b"] and seen == [threading.get_ident()]


def test_worker_error_propagates_and_loads_nothing_half(tmp_path, monkeypatch):
    make_tiny("llama", tmp_path / "m")
    from quantload.schemes import bnb4

    def boom(self, w):
        raise RuntimeError("quantizer exploded")
    monkeypatch.setattr(bnb4.Bnb4Scheme, "quantize", boom)
    with pytest.raises(RuntimeError, match="quantizer exploded"):
        quantload.load(tmp_path / "m", quantize="nf4", progress=False)


@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_same_model_whatever_the_worker_count(tmp_path, monkeypatch, quantize):
    make_tiny("llama", tmp_path / "m", dtype=torch.bfloat16)
    states = []
    for workers in ("1", "3"):
        monkeypatch.setenv("QUANTLOAD_LOAD_WORKERS", workers)
        m = quantload.load(tmp_path / "m", quantize=quantize, progress=False)
        states.append(m.state_dict())
    a, b = states
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bad", ["0", "-2", "many"])
def test_bad_worker_count_is_a_config_error(monkeypatch, bad):
    monkeypatch.setenv("QUANTLOAD_LOAD_WORKERS", bad)
    with pytest.raises(ConfigError, match=f"QUANTLOAD_LOAD_WORKERS must be a positive integer, got '{bad}'"):
        load_workers()


def test_staging_off_cuda_is_a_plain_to():
    t = torch.arange(10, dtype=torch.bfloat16)
    s = Staging()
    assert s.to(t, "cpu") is t  # same device and dtype: no copy (a zero-copy view stays a view)
    f = s.to(t, torch.device("cpu"), torch.float32)
    assert f.dtype == torch.float32 and torch.equal(f, t.float())
    s.close()
