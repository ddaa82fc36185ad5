"""BitsAndBytesConfig dicts -> BnbSpec -> back, compared with transformers' own BitsAndBytesConfig."""
import json

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from quantload.config import resolve_quantize
from quantload.errors import ConfigError, UnsupportedError
from quantload.schemes.bnb4 import Bnb4Scheme
from quantload.schemes.bnb8 import Bnb8Scheme
from quantload.schemes.bnb_config import BnbSpec, parse_bnb_config
from quantload.schemes.registry import spec_from_dict

KWARGS = [
    dict(load_in_4bit=True),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
         bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16",
         bnb_4bit_quant_storage="bfloat16", llm_int8_skip_modules=["lm_head", "mlp.gate"]),
    dict(load_in_8bit=True),
    dict(load_in_8bit=True, llm_int8_threshold=4.5, llm_int8_skip_modules=["out_proj"],
         llm_int8_enable_fp32_cpu_offload=True),
]


def config_json_form(kwargs):
    """What transformers writes into config.json (quant_method as the plain string)."""
    return json.loads(json.dumps(BitsAndBytesConfig(**kwargs).to_dict()))


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_round_trip_equals_transformers(kwargs):
    theirs = BitsAndBytesConfig(**kwargs).to_dict()
    for source in (config_json_form(kwargs), {k: v for k, v in kwargs.items()}):
        spec = spec_from_dict({"quant_method": "bitsandbytes", **source})
        assert isinstance(spec, BnbSpec) and spec.method == "bitsandbytes"
        ours = spec.to_dict()
        assert list(ours) == list(theirs)
        assert ours == theirs
        assert json.dumps(ours) == json.dumps(theirs)


def test_scheme_from_4bit_config():
    spec = parse_bnb_config(config_json_form(KWARGS[1]))
    s = spec.scheme
    assert isinstance(s, Bnb4Scheme)
    assert (s.quant_type, s.blocksize, s.double_quant, s.compute_dtype, s.quant_storage) == \
        ("nf4", 64, True, torch.bfloat16, torch.uint8)
    assert spec.compute_dtype == torch.bfloat16
    fp4 = parse_bnb_config(config_json_form(KWARGS[2])).scheme
    assert (fp4.quant_type, fp4.double_quant, fp4.compute_dtype, fp4.quant_storage) == \
        ("fp4", False, torch.float16, torch.bfloat16)
    assert parse_bnb_config({"load_in_4bit": True}).scheme.compute_dtype == torch.float32  # transformers' default


def test_scheme_from_8bit_config():
    s = parse_bnb_config(config_json_form(KWARGS[4])).scheme
    assert isinstance(s, Bnb8Scheme) and s.threshold == 4.5


def test_skip_modules():
    spec = parse_bnb_config({"load_in_4bit": True})
    lin = nn.Linear(4, 4)
    assert spec.skip_modules == ["lm_head"]
    assert spec.scheme_for("lm_head", lin) is None
    assert spec.scheme_for("model.layers.0.mlp.down_proj", lin) is spec.scheme
    assert spec.scheme_for("model.embed_tokens", nn.Embedding(4, 4)) is None
    custom = parse_bnb_config(config_json_form(KWARGS[4]))
    assert custom.skip_modules == ["out_proj"]
    assert custom.scheme_for("lm_head", lin) is custom.scheme
    assert custom.scheme_for("model.layers.1.self_attn.out_proj", lin) is None
    assert custom.to_dict()["llm_int8_skip_modules"] == ["out_proj"]


def test_short_names():
    nf4 = resolve_quantize("nf4")
    assert isinstance(nf4, BnbSpec) and nf4.scheme.quant_type == "nf4" and nf4.scheme.double_quant
    assert resolve_quantize("fp4").scheme.quant_type == "fp4"
    assert isinstance(resolve_quantize("int8").scheme, Bnb8Scheme)
    assert nf4.to_dict() == BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True).to_dict()


BAD = {
    "both 4 and 8 bit": ({"load_in_4bit": True, "load_in_8bit": True}, ConfigError, "both true"),
    "neither": ({"quant_method": "bitsandbytes"}, ConfigError, "neither load_in_4bit nor load_in_8bit"),
    "unknown quant type": ({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, UnsupportedError,
                           "bnb_4bit_quant_type='int4'"),
    "quant type not a string": ({"load_in_4bit": True, "bnb_4bit_quant_type": 4}, ConfigError, "must be a string"),
    "private flag contradicts": ({"load_in_4bit": True, "_load_in_4bit": False}, ConfigError,
                                 "load_in_4bit=True contradicts _load_in_4bit=False"),
    "flag not bool": ({"load_in_8bit": "yes"}, ConfigError, "load_in_8bit='yes' must be a boolean"),
    "double quant not bool": ({"load_in_4bit": True, "bnb_4bit_use_double_quant": 1}, ConfigError,
                              "bnb_4bit_use_double_quant=1 must be a boolean"),
    "bad compute dtype": ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "int3"}, ConfigError,
                          "bnb_4bit_compute_dtype='int3'"),
    "bad storage": ({"load_in_4bit": True, "bnb_4bit_quant_storage": "int4"}, ConfigError,
                    "bnb_4bit_quant_storage='int4'"),
    "threshold not a number": ({"load_in_8bit": True, "llm_int8_threshold": "6"}, ConfigError,
                               "llm_int8_threshold='6' must be a number"),
    "skip modules not a list": ({"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"}, ConfigError,
                                "must be a list"),
    "fp16 weights": ({"load_in_8bit": True, "llm_int8_has_fp16_weight": True}, UnsupportedError,
                     "has_fp16_weights=True"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config(case):
    d, kind, fragment = BAD[case]
    with pytest.raises(kind) as e:
        parse_bnb_config(d)
    assert fragment in str(e.value)
