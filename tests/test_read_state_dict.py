"""read_state_dict decodes every fixture with the transformers-style config from its json, no model."""
import json

import torch
from safetensors.torch import load_file

import quantload
from quantload.schemes.base import QTensor


def fixture_config(j: dict, name: str) -> dict:
    qc = j.get("quantization_config") or j.get("quantize_config")
    if qc is not None:
        qc = dict(qc)
        qc.setdefault("quant_method", "gptq")
        return qc
    if name.startswith("quanto"):
        return {"quant_method": "quanto", "weights": j["quanto_qmap"]["layer"]["weights"]}
    if name.startswith("hqq"):
        return {"quant_method": "hqq"}
    if name.startswith("bnb_int8"):
        return {"quant_method": "bitsandbytes", "load_in_8bit": True}
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": j["quant_type"],
            "bnb_4bit_use_double_quant": j["double_quant"]}


def names(fixtures_dir):
    return sorted(p.name[: -len(".json")] for p in fixtures_dir.glob("*.json"))


def pytest_generate_tests(metafunc):
    if "fixture_name" in metafunc.fixturenames:
        from conftest import FIXTURES
        metafunc.parametrize("fixture_name", names(FIXTURES))


def test_fixture_decodes_to_the_tools_weight(fixture_name, fixtures_dir):
    j = json.loads((fixtures_dir / f"{fixture_name}.json").read_text())
    sd = quantload.read_state_dict(fixtures_dir / f"{fixture_name}.safetensors",
                                   quantization_config=fixture_config(j, fixture_name))
    qt = sd["layer.weight"]
    assert isinstance(qt, QTensor)
    expected = load_file(fixtures_dir / f"{fixture_name}.expected.safetensors")["layer.weight.dequantized"]
    assert tuple(qt.shape) == tuple(expected.shape)
    got = qt.dequantize(expected.dtype)
    if fixture_name.startswith("gptq"):
        # the expected weight is AutoGPTQ's fp16 forward on an identity input minus the bias: doing the
        # same to ours reproduces it bit for bit
        b = sd["layer.bias"][:, None]
        assert torch.equal((got + b) - b, expected)
    else:
        assert torch.equal(got, expected)
    assert qt.nbytes < expected.numel() * expected.element_size()  # it stays packed
