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


def bnb_generic_path(model):
    """Keep bitsandbytes on its generic 4-bit path (dequantize, then F.linear: the math quantload does).
    On a CPU with AVX512-BF16 (bnb.functional.has_avx512bf16()) Linear4bit.forward would otherwise
    convert each weight to its packed layout and run its own bfloat16 kernel, whose text can differ;
    that state is tested apart (test_checkpoint_bnb_saves_after_its_avx512bf16_forward). Returns the path
    bnb would have taken here, for the test's record."""
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return "avx512bf16 kernel (disabled)" if bnb.functional.has_avx512bf16() else "generic"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantload_saved_loads_in_transformers(name, real, tok, tmp_path):
    # exact=True: the format is what is tested here, so quantload computes as bitsandbytes does
    model = quantload.load(real, quantize=bnb_config(name).to_dict(), dtype=torch.float32, progress=False,
                           exact=True)
    ours = greedy(model, tok)
    quantload.save(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes"
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    print("bitsandbytes path:", bnb_generic_path(theirs_model))
    assert greedy(theirs_model, tok) == ours


LOAD_WITHOUT_BNB = r"""
import json, sys, torch, quantload
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = quantload.load(path, dtype=torch.float32, progress=False, exact=True)  # bitsandbytes' numerics
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
    print("bitsandbytes path:", bnb_generic_path(ref))
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


@pytest.mark.parametrize("name", ["nf4-dq", "fp4"])
def test_checkpoint_bnb_saves_after_its_avx512bf16_forward(name, real, tmp_path):
    """What transformers + bnb save after a forward on an AVX512-BF16 CPU, made on any CPU: each
    Linear4bit converted with bnb's own `_convert_weight_packed_for_cpu` (what its forward does there),
    then save_pretrained (bnb's inverse). FP4 without double quant keeps a bfloat16 absmax
    [in/blocksize, out]: quantload repairs it, with one warning per layer, to the codes x bfloat16 absmax
    bnb's kernel computed with. NF4+DQ comes back re-quantized (nested_dtype of the model dtype): loaded
    as bnb itself decodes it."""
    import bitsandbytes as bnb
    BF = bnb.functional
    ref = transformers.AutoModelForCausalLM.from_pretrained(real, quantization_config=bnb_config(name),
                                                            dtype=torch.float32)
    expected = {}
    for mname, m in ref.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            st = m.weight.quant_state
            absmax = BF.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
            plain = BF.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=st.shape, code=st.code,
                                  blocksize=st.blocksize, quant_type=st.quant_type, dtype=st.dtype)
            if not st.nested:
                expected[mname] = BF.dequantize_4bit(m.weight.data, plain)
            m.weight.data, m.weight.quant_state = BF._convert_weight_packed_for_cpu(m.weight.data, st)
    ref.save_pretrained(tmp_path / "t")
    model = quantload.load(tmp_path / "t", dtype=torch.float32, progress=False)
    warnings = [w for w in model.load_report.warnings if "AVX512-BF16" in w]
    modules = dict(model.named_modules())
    if name == "fp4":
        assert len(warnings) == 30 * 7 and len(expected) == 30 * 7
        for mname, w in expected.items():
            assert torch.equal(modules[mname].dequantized_weight(torch.float32), w), mname
    else:
        assert warnings == []
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t", dtype=torch.float32)
        n = 0
        for mname, m in again.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                assert m.weight.quant_state.state2.dtype == torch.float32
                w = BF.dequantize_4bit(m.weight.data, m.weight.quant_state)
                assert torch.equal(modules[mname].dequantized_weight(torch.float32), w), mname
                n += 1
        assert n == 30 * 7
