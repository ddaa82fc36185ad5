"""A real model (SmolLM2-135M) quantized on the fly to int4 group 128, saved as compressed-tensors
pack-quantized, reloaded by quantload and by transformers + compressed-tensors: same greedy text."""
import json
import os
import sys

import pytest
import torch
import transformers

import quantload

sys.path.insert(0, os.path.dirname(__file__))
import realmodels  # noqa: E402
from test_interchange_bnb import PROMPTS, greedy  # noqa: E402

pytestmark = pytest.mark.slow


def test_int4_saved_by_quantload_loads_in_transformers_compressed_tensors(tmp_path):
    real = realmodels.smollm2_bf16()
    tok = quantload.load_tokenizer(real)
    # an explicit group of 128 ("int4" alone picks group 64 for SmolLM2): its hidden size 576 is not a multiple
    # of 128, so only down_proj (1536 inputs) takes group 128; the other projections stay dense (with a
    # warning) and are listed in the config's ignore list, as compressed-tensors needs
    from quantload.schemes.affine import ct_config
    with pytest.warns(quantload.QuantloadWarning, match=r"180 layer\(s\) left unquantized"):
        model = quantload.load(real, quantize=ct_config(4, group_size=128), dtype=torch.float32, progress=False,
                               exact=True)  # compressed-tensors' numerics: compared with transformers below
    assert model.load_report.quantized_modules == {"ct-pack-int4-group128-sym": 30}
    assert "model.layers.0.self_attn.q_proj" in model.config.quantization_config["ignore"]
    ours = greedy(model, tok)
    quantload.save(model, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"]) == (4, 128, "group")

    again = quantload.load(tmp_path / "q", dtype=torch.float32, progress=False, exact=True)
    assert greedy(again, tok) == ours
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert greedy(theirs, tok) == ours
    assert len(PROMPTS) >= 3
