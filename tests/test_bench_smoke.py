"""The bench harness's own logic on synthetic results (no model loads, no timing asserts): medians,
ratios, targets, the table, the run order and which runners run. Keeps bench/ from rotting."""
import argparse
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import report, run  # noqa: E402
from bench.cases import CASES_BY_NAME, RUNNERS  # noqa: E402


def _ok(**metrics):
    return {"ok": True, "metrics": metrics}


def test_summarize_takes_medians_and_keeps_errors():
    s = report.summarize([_ok(seconds=3.0, exact=True, tokens=[1, 2]), _ok(seconds=1.0, exact=False),
                          _ok(seconds=2.0, exact=True), {"ok": False, "error": "boom"}])
    assert s["runs"] == 4 and s["ok"] == 3
    assert s["median"]["seconds"] == 2.0
    assert s["median"]["exact"] is False          # a bool is true only if every run says so
    assert s["median"]["tokens"] == [1, 2]
    assert s["errors"] == ["boom"]


def test_lookup_prefers_the_most_specific_error():
    s = report.summarize([_ok(**{"Q4_K.error": "no scheme", "Q8_0.elements_per_s": 5.0})])
    assert report.lookup(s, "Q8_0.elements_per_s") == (5.0, None)
    assert report.lookup(s, "Q4_K.elements_per_s") == (None, "no scheme")
    failed = report.summarize([{"ok": False, "error": "ImportError: x"}])
    assert report.lookup(failed, "seconds") == (None, "ImportError: x")


def test_ratio_and_target_directions():
    load_s, rss = CASES_BY_NAME["gguf_load_smollm2"].metrics[:2]
    assert report.ratio(load_s, 2.0, 20.0) == 10.0          # time: alternative / quantload
    assert report.met(load_s, 10.0) is True and report.met(load_s, 9.9) is False
    assert report.ratio(rss, 100.0, 400.0) == 0.25           # bytes: quantload / alternative
    assert report.met(rss, 0.25) is True and report.met(rss, 0.5) is False
    tok = CASES_BY_NAME["decode_nf4"].metrics[0]
    assert report.ratio(tok, 6.0, 2.0) == 3.0                # throughput: quantload / alternative
    assert report.ratio(tok, None, 2.0) is None and report.met(tok, None) is None


def _status(**states):
    return {name: {"state": st, "reason": "" if st == "ran" else f"why {name}"} for name, st in states.items()}


def test_rows_show_figures_errors_and_missing_alternatives():
    cases = [CASES_BY_NAME[n] for n in ("memcpy", "gguf_load_smollm2", "nf4_prequantized_load", "gguf_dequantize",
                                        "decode_nf4")]
    summaries = {
        "machine.memcpy": report.summarize([_ok(copy_gb_per_s=8.0, traffic_gb_per_s=16.0)]),
        "ql.gguf_smollm2": report.summarize([_ok(seconds=2.0, peak_rss=300 * 2**20, import_rss=200 * 2**20,
                                                 model_bytes=100 * 2**20)] * 3),
        "hf.gguf_smollm2": report.summarize([_ok(seconds=24.0, peak_rss=1200 * 2**20, model_bytes=540 * 2**20)]),
        "ql.nf4_prequantized": report.summarize([{"ok": False, "error": "UnsupportedError: no bnb"}]),
        "ql.gguf_kernels": report.summarize([_ok(**{"Q4_K.elements_per_s": 2e9, "Q4_K.gb_per_s": 8.0,
                                                    "Q4_K.matches_gguf_py": True, "IQ1_M.error": "not yet"})]),
        "ggufpy.gguf_kernels": report.summarize([_ok(**{"Q4_K.elements_per_s": 2e8, "Q4_K.gb_per_s": 0.8,
                                                        "IQ1_M.elements_per_s": 5e7, "IQ1_M.gb_per_s": 0.2})]),
    }
    status = _status(**{"machine.memcpy": "ran", "ql.gguf_smollm2": "ran", "hf.gguf_smollm2": "ran",
                        "ql.nf4_prequantized": "ran", "hf.nf4_prequantized": "unavailable",
                        "ql.gguf_kernels": "ran", "ggufpy.gguf_kernels": "ran"})
    rows = report.build_rows(cases, summaries, status)
    by = {(r.case, r.metric): r for r in rows}

    load = by[("gguf_load_smollm2", "load time")]
    assert (load.quantload, load.alternative, load.ratio, load.met) == ("2.00 s", "24.00 s", 12.0, True)
    rss = by[("gguf_load_smollm2", "peak RSS")]
    assert rss.quantload == "300 MiB (imports 200)" and rss.ratio == 0.25 and rss.met is True

    pre = by[("nf4_prequantized_load", "load time")]
    assert pre.quantload == "error: UnsupportedError: no bnb"
    assert pre.alternative == "why hf.nf4_prequantized" and pre.ratio is None and pre.met is None

    q4k = by[("gguf_dequantize", "Q4_K elements/s")]
    assert q4k.ratio == pytest.approx(10.0) and q4k.met is True and "bit-exact with gguf-py" in q4k.notes
    assert by[("gguf_dequantize", "Q4_K bytes moved")].quantload == "8.00 GB/s (50% of memcpy)"
    iq1m = by[("gguf_dequantize", "IQ1_M elements/s")]
    assert iq1m.quantload == "error: not yet" and iq1m.alternative == "50 M/s"
    assert [r.metric for r in rows if r.case == "gguf_dequantize"][0] == "Q4_K elements/s"  # quantload's order

    assert by[("decode_nf4", "-")].quantload == "skipped: not run"   # a case whose runners did not run

    table = report.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "**gguf_load_smollm2**" in table
    summary = report.targets_summary(rows)
    assert summary.startswith("targets: 3 met, 0 not met")


def test_a_library_changed_mid_run_is_flagged():
    case = CASES_BY_NAME["decode_dense"]
    ql = report.summarize([dict(_ok(tokens_per_s=6.0), src_state="a"), dict(_ok(tokens_per_s=5.0), src_state="b")])
    alt = report.summarize([_ok(tokens_per_s=6.0)])
    status = _status(**{"ql.dense": "ran", "hf.dense": "ran"})
    row = report.build_rows([case], {"ql.dense": ql, "hf.dense": alt}, status)[0]
    assert row.quantload == "5.5 tok/s" and "quantload's source changed between its runs (2 versions)" in row.notes


def test_token_agreement_note():
    ql = report.summarize([_ok(tokens_per_s=8.0, tokens=[1, 2, 3])])
    same = report.summarize([_ok(tokens_per_s=2.0, tokens=[1, 2, 3])])
    other = report.summarize([_ok(tokens_per_s=2.0, tokens=[1, 9, 3])])
    case = CASES_BY_NAME["decode_nf4"]
    status = _status(**{"ql.nf4_decode": "ran", "hf.nf4_decode": "ran"})
    row = report.build_rows([case], {"ql.nf4_decode": ql, "hf.nf4_decode": same}, status)[0]
    assert row.notes == ["same 3 tokens as the alternative"] and row.met is True
    row = report.build_rows([case], {"ql.nf4_decode": ql, "hf.nf4_decode": other}, status)[0]
    assert row.notes == ["tokens differ from the alternative's from token 1"]


def test_schedule_alternates_sides_and_runs_a_shared_runner_once_per_repeat():
    cases = [CASES_BY_NAME[n] for n in ("decode_nf4", "decode_int4", "decode_gguf_q4_1")]
    status = _status(**{"ql.nf4_decode": "ran", "hf.nf4_decode": "ran", "ql.int4": "skipped",
                        "ql.gguf_decode": "ran"})
    order = run.schedule(cases, status, 2)
    assert order == [(0, "ql.nf4_decode"), (0, "hf.nf4_decode"), (0, "ql.gguf_decode"),
                     (1, "hf.nf4_decode"), (1, "ql.nf4_decode"), (1, "ql.gguf_decode")]


def test_runner_status_without_the_alternatives_installed():
    args = argparse.Namespace(quick=False, no_alternatives=False)
    cases = [CASES_BY_NAME[n] for n in ("gguf_load_smollm2", "nf4_quantize_kernel", "gguf_load_gemma")]
    st = run.runner_status(cases, args, installed=lambda m: m == "transformers")
    assert st["ql.gguf_smollm2"]["state"] == "ran"
    assert st["hf.gguf_smollm2"] == {"state": "unavailable", "reason": "not installed: pip install gguf"}
    assert st["bnb.nf4_kernels"]["reason"] == "not installed: pip install bitsandbytes"
    assert st["ql.gguf_gemma"]["state"] == "skipped" and "--gemma-gguf" in st["ql.gguf_gemma"]["reason"]
    quick = run.runner_status(cases, argparse.Namespace(quick=True, no_alternatives=False), installed=lambda m: True)
    assert quick["hf.gguf_smollm2"]["reason"] == "skipped by --quick (slow alternative)"
    assert quick["bnb.nf4_kernels"]["state"] == "ran"
    alone = run.runner_status(cases, argparse.Namespace(quick=False, no_alternatives=True), installed=lambda m: True)
    assert {n for n, s in alone.items() if s["state"] == "ran"} == {"ql.gguf_smollm2", "ql.nf4_kernels"}


def test_every_case_names_known_runners_and_args_are_checked():
    for case in CASES_BY_NAME.values():
        assert case.quantload in RUNNERS and RUNNERS[case.quantload].side == "quantload" or case.name == "memcpy"
        assert case.alternative is None or RUNNERS[case.alternative].side == "alternative"
    assert run.parse_args(["--quick"]).repeats == 1
    assert run.parse_args(["--only", "memcpy,decode_nf4"]).only == ["memcpy", "decode_nf4"]
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "no_such_case"])


def test_chart_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import chart
    rows = [report.Row("a", "A", "load time", "1 s", "10 s", 10.0, ">= 10x", True, unit="s", target_value=10.0),
            report.Row("a", "A", "peak RSS", "1", "2", 0.5, "<= 1/3", False, unit="bytes", target_value=1 / 3)]
    assert chart.draw(rows, str(tmp_path / "c.png")) is None
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.draw([], str(tmp_path / "none.png")) is not None


# --- issue #10's runners: llama.cpp, the gemma file, the scale series -----------------------------------
from bench import inputs, worker  # noqa: E402
from bench.cases import SCALE_CASES, Runner  # noqa: E402


def test_gguf_parts_are_assembled_once_and_checked(tmp_path):
    import hashlib
    parts = []
    for i, data in enumerate((b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7)):
        parts.append(tmp_path / f"m.gguf.part{i:02d}")
        parts[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in parts)
    out = tmp_path / "cache" / "m.gguf"
    with pytest.raises(ValueError, match="sha256"):
        inputs.assemble_gguf(parts, out, "0" * 64)
    assert not out.exists() and list(out.parent.iterdir()) == []          # nothing half-written left
    assert inputs.assemble_gguf(parts, out, hashlib.sha256(whole).hexdigest()) == out
    assert out.read_bytes() == whole
    parts[2].write_bytes(b"d" * 7)                                         # same size: taken as made before
    assert inputs.assemble_gguf(parts, out, "not checked again").read_bytes() == whole


def test_bench_threads_follow_the_flag(monkeypatch):
    monkeypatch.setenv(inputs.THREADS_ENV, "3")
    assert inputs.bench_threads() == 3
    monkeypatch.delenv(inputs.THREADS_ENV)
    assert 1 <= inputs.bench_threads() <= (__import__("os").cpu_count() or 1)
    assert len(inputs.prefill_text().split()) > inputs.PREFILL_TOKENS     # enough text for 256 tokens


def test_llamacpp_cases_compare_the_same_metric_and_need_llama_cpp():
    for name in ("llamacpp_decode_smollm2", "llamacpp_prefill_smollm2", "llamacpp_decode_gemma",
                 "llamacpp_prefill_gemma"):
        case = CASES_BY_NAME[name]
        assert RUNNERS[case.alternative].requires == ("llama_cpp",)
        assert case.metrics[0].target == 0.5
    args = argparse.Namespace(quick=False, no_alternatives=False)
    st = run.runner_status([CASES_BY_NAME["llamacpp_decode_smollm2"]], args, installed=lambda m: m != "llama_cpp")
    assert st["ql.decode_smollm2"]["state"] == "ran"
    assert st["llama.decode_smollm2"] == {"state": "unavailable", "reason": "not installed: pip install llama_cpp"}
    tok = CASES_BY_NAME["llamacpp_prefill_smollm2"].metrics[0]
    assert report.fmt_value(tok, 123.4) == "123.4 tok/s" and report.ratio(tok, 60.0, 100.0) == 0.6


def test_every_runner_names_a_function_of_the_bench():
    import importlib
    for r in RUNNERS.values():
        module, fn, *args = r.fn.split(":")
        assert callable(getattr(importlib.import_module(f"bench.{module}"), fn)), r.fn
        assert len(args) <= 1
        assert all(n in inputs.BUILDERS for n in r.needs), r.name


def test_worker_passes_the_runner_argument(monkeypatch):
    monkeypatch.setitem(RUNNERS, "t.scale_dir", Runner("t.scale_dir", "inputs:scale_dir:7b", "quantload", "t"))
    assert worker.run("t.scale_dir") == inputs.scale_dir("7b")


def test_scale_series_only_behind_its_flag():
    assert not any(c.name.startswith("scale_") for c in CASES_BY_NAME.values())
    a = run.parse_args(["--scale", "1.5b,7b"])
    assert a.scale == ["1.5b", "7b"]
    with pytest.raises(SystemExit):
        run.parse_args(["--scale", "13b"])
    cases = SCALE_CASES["1.5b"]
    assert [c.name for c in cases] == ["scale_nf4_1.5b", "scale_gguf_1.5b"]
    assert {"scale_1.5b", "scale_1.5b_gguf"} <= set(RUNNERS[cases[1].quantload].needs)
    order = list(inputs.BUILDERS)
    assert order.index("bf16") < order.index("scale_1.5b") < order.index("scale_1.5b_gguf")


@pytest.mark.parametrize("size", ["tiny", "1.5b", "7b"])
def test_scale_checkpoint_has_the_tensors_of_its_llama(size):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from bench import scale
    c = inputs.SCALE_CONFIGS[size]
    cfg = LlamaConfig(vocab_size=inputs.SCALE_VOCAB, hidden_size=c["hidden"], intermediate_size=c["intermediate"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
                      tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert dict(scale._tensors(c)) == expected
    assert scale.parameter_count(size) == sum(p.numel() for p in model.parameters())


def test_awq_input_packs_as_quantload_reads_autoawq():
    import torch
    from quantload.schemes.awq import AWQScheme
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    q, z, s = inputs.awq_rtn(w)
    assert q.min() >= 0 and q.max() <= 15 and z.min() >= 0 and z.max() <= 15
    scheme = AWQScheme(inputs.AWQ_GROUP, version="gemm", zero_point=True, bits=4)
    qt = scheme.decode({"qweight": inputs.awq_pack_gemm(q.t().contiguous()),
                        "qzeros": inputs.awq_pack_gemm(z.t().contiguous()), "scales": s.t().contiguous()},
                       shape=(16, 128))
    expected = (q.reshape(16, 2, 64).half() - z[..., None].half()) * s[..., None]   # AutoAWQ's (q - z) * s
    assert torch.equal(scheme.dequantize(qt, torch.float32), expected.reshape(16, 128).float())
    assert (scheme.dequantize(qt, torch.float32) - w).abs().max() <= s.float().max() * 0.51   # round to nearest
