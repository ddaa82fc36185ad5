"""Fuzzing the quantization_config parsers (spec_from_dict for every registered quant_method, and the
config.json / quantize_config.json reading of checkpoint_spec; see fuzz_harness.py for the property, the
bounds and QUANTLOAD_FUZZ_SECONDS).

Seeds: the quantization_config of every fixture written by a real tool (AWQ, compressed-tensors, GPTQ),
transformers' own BitsAndBytesConfig / HqqConfig / QuantoConfig dicts, and GPTQ `dynamic` rules. Each case
edits the dict (any value replaced, deleted or added). A spec that parses must answer scheme_for() for
the usual module names and render itself back with to_dict().
"""
from __future__ import annotations

import copy
import json
import pathlib

import torch
import transformers
from fuzz_harness import FUZZ_SECONDS, Budget, edit_json, fuzz_settings, json_edits, run_case, run_fuzz
from hypothesis import given
from hypothesis import strategies as st

from quantload.load_setup import checkpoint_spec
from quantload.schemes.registry import spec_from_dict

FILE = "config.json"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MODULES = [("model.layers.0.self_attn.q_proj", torch.nn.Linear(64, 32)), ("lm_head", torch.nn.Linear(64, 100)),
           ("model.layers.3.mlp.down_proj", torch.nn.Linear(128, 64)), ("model.embed_tokens", torch.nn.Embedding(10, 8))]


def _seeds() -> list[dict]:
    out = []
    for f in sorted(FIXTURES.glob("*.json")):
        doc = json.loads(f.read_text())
        qc = doc.get("quantization_config") or doc.get("quantize_config")
        if qc:
            out.append(qc)
    out.append(transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True).to_dict())
    out.append(transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]).to_dict())
    out.append({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                "dynamic": {"-:.*down_proj": {}, "+:.*q_proj": {"bits": 8, "group_size": 64}}})
    for make in (lambda: transformers.HqqConfig(nbits=4, group_size=64),
                 lambda: transformers.QuantoConfig(weights="int4")):
        try:
            out.append(make().to_dict())
        except Exception:      # a config class that needs its optional package: the other seeds remain
            pass
    return out


SEEDS = _seeds()


def test_seeds_parse():
    assert len(SEEDS) >= 10
    for qc in SEEDS:
        spec = spec_from_dict(copy.deepcopy(qc), file=FILE)
        assert any(spec.scheme_for(n, m) is not None for n, m in MODULES), qc


def _exercise(spec):
    for name, mod in MODULES:
        spec.scheme_for(name, mod)
        spec.scheme_for(name, None)
    json.dumps(spec.to_dict(), default=str)
    repr(spec)


def test_quantization_config():
    budget = Budget("quantization_config", FUZZ_SECONDS * 3 / 4)   # with config.json reading: one parser

    @fuzz_settings()
    @given(seed=st.integers(0, len(SEEDS) - 1), edits=json_edits)
    def fuzz(seed, edits):
        budget.tick()
        qc = edit_json(copy.deepcopy(SEEDS[seed]), edits)
        # (that every such error names config.json is issue #12's message item, tested beside the catalogue)
        run_case(budget, lambda: _exercise(spec_from_dict(qc, file=FILE)))
    run_fuzz(budget, fuzz, need_valid=True)


def test_config_files(tmp_path):
    """The same dicts read from disk the way a checkpoint directory gives them: quantization_config in
    config.json (through transformers' config), or an older quantize_config.json beside it."""
    budget = Budget("config.json / quantize_config.json", FUZZ_SECONDS / 4)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4)

    @fuzz_settings()
    @given(seed=st.integers(0, len(SEEDS) - 1), edits=json_edits, beside=st.booleans())
    def fuzz(seed, edits, beside):
        budget.tick()
        qc = edit_json(copy.deepcopy(SEEDS[seed]), edits)
        for name in ("quantize_config.json", "config.json"):
            (tmp_path / name).unlink(missing_ok=True)
        if beside:
            (tmp_path / "quantize_config.json").write_text(json.dumps(qc))
            config = cfg
        else:
            config = copy.deepcopy(cfg)
            config.quantization_config = qc
        run_case(budget, lambda: checkpoint_spec(str(tmp_path), config) and None)
    run_fuzz(budget, fuzz)
