"""bitsandbytes interchange on a real model (SmolLM2-135M-Instruct), both ways:
- a checkpoint quantload saved loads in transformers + bitsandbytes (CPU) and generates the same greedy text;
- a checkpoint transformers + bitsandbytes saved loads in quantload, without importing bitsandbytes, and
  generates the same greedy text as transformers.
NF4 with double quant, FP4, LLM.int8."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import quantload

sys.path.insert(0, os.path.dirname(__file__))
import realmodels  # noqa: E402

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 12
CONFIGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def greedy(model, tok) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            g = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(g[0, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def real():
    return realmodels.smollm2_bf16()


@pytest.fixture(scope="module")
def tok(real):
    return quantload.load_tokenizer(real)


def bnb_config(name):
    return transformers.BitsAndBytesConfig(**CONFIGS[name])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantload_saved_loads_in_transformers(name, real, tok, tmp_path):
    model = quantload.load(real, quantize=bnb_config(name).to_dict(), dtype=torch.float32, progress=False)
    ours = greedy(model, tok)
    quantload.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes"
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert greedy(theirs_model, tok) == ours


LOAD_WITHOUT_BNB = r"""
import json, sys, torch, quantload
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = quantload.load(path, dtype=torch.float32, progress=False)
tok = quantload.load_tokenizer(path)
out = []
for p in prompts:
    ids = tok(p, return_tensors="pt").input_ids
    with torch.inference_mode():
        g = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    out.append(g[0, ids.shape[1]:].tolist())
print(json.dumps({"tokens": out, "bnb_imported": "bitsandbytes" in sys.modules,
                  "schemes": model.load_report.quantized_modules}))
"""


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_saved_loads_in_quantload_without_bitsandbytes(name, real, tok, tmp_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(real, quantization_config=bnb_config(name),
                                                            dtype=torch.float32)
    expected = greedy(ref, tok)
    ref.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    r = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_BNB, str(tmp_path / "t"), json.dumps(PROMPTS),
                        str(NEW_TOKENS)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["bnb_imported"] is False
    assert sum(got["schemes"].values()) == 30 * 7  # every Linear of the 30 blocks, lm_head left dense
    assert got["tokens"] == expected
