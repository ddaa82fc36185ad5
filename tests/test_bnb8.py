"""bitsandbytes LLM.int8 scheme against bitsandbytes itself (CPU) and the golden fixture."""
import pytest
import torch
from safetensors.torch import load_file

from quantload.errors import ConfigError, MissingTensorError, QuantStateError, ShapeMismatchError, UnsupportedError
from quantload.schemes.bnb8 import Bnb8Scheme, int8_matmul_exact

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
PIECES = ("weight", "SCB", "weight_format")


def bnb_layer(w, bias, threshold):
    o, i = w.shape
    lin = bnb.nn.Linear8bitLt(i, o, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return lin.to("cpu").eval()


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w[1] = 0                    # an all-zero row: SCB 0, codes 0
    w[2, 3] = 0.5               # a row with one large value
    return w


def test_fixture_decodes_bit_exact_and_reencodes(fixtures_dir):
    stored = load_file(fixtures_dir / "bnb_int8_96x256_float16.safetensors")
    expected = load_file(fixtures_dir / "bnb_int8_96x256_float16.expected.safetensors")
    pieces = {k.removeprefix("layer."): v for k, v in stored.items() if k != "layer.bias"}
    qt = Bnb8Scheme().decode(pieces, shape=(96, 256), file="f", prefix="layer")
    assert torch.equal(qt.dequantize(torch.float32), expected["layer.weight.dequantized"])
    enc = qt.encode()
    assert list(enc) == list(PIECES)
    for k in PIECES:
        assert enc[k].dtype == pieces[k].dtype and enc[k].shape == pieces[k].shape and torch.equal(enc[k], pieces[k])
    # and our quantizer reproduces the file from the original weight
    ours = Bnb8Scheme().quantize(expected["layer.weight.original"]).encode()
    assert all(torch.equal(ours[k], pieces[k]) for k in PIECES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(96, 256), (7, 9), (33, 65), (1, 1)])
def test_quantize_encode_dequantize_match_bnb(shape, dtype):
    w = weight(shape, dtype, seed=shape[1]) if shape[0] > 2 else torch.randn(shape).to(dtype)
    sd = bnb_layer(w, None, 6.0).state_dict()
    scheme = Bnb8Scheme()
    qt = scheme.quantize(w)
    enc = qt.encode()
    assert list(enc) == list(sd) == list(PIECES)
    for k in PIECES:
        assert enc[k].dtype == sd[k].dtype and enc[k].shape == sd[k].shape and torch.equal(enc[k], sd[k]), k
    decoded = scheme.decode(dict(sd), shape=shape)
    for dt in (torch.float32, dtype):
        ref = BF.int8_vectorwise_dequant(sd["weight"], sd["SCB"]).to(dt)
        assert torch.equal(decoded.dequantize(dt), ref)
    assert qt.nbytes == scheme.nbytes_for(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("shape", [(96, 256), (33, 65)])
def test_linear_matches_linear8bitlt(shape, threshold, dtype):
    """Bit-exact: with in_features <= 1040 bnb's CPU float32 product of int8 values is exact, as ours is."""
    w = weight(shape, dtype, seed=1)
    bias = torch.randn(shape[0]).to(dtype)
    lin = bnb_layer(w, bias, threshold)
    qt = Bnb8Scheme(threshold).decode({k: v for k, v in lin.state_dict().items() if k != "bias"}, shape=shape)
    x = (torch.randn(4, 3, shape[1]) * 2).to(dtype)
    x[..., 2] = 8.0              # an outlier column
    x[0, 1, 5] = -7.5            # an outlier in one row only
    x[1, 0] = 0                  # an all-zero input row
    with torch.no_grad():
        theirs = lin(x.clone())
    ours = Bnb8Scheme(threshold).linear(x, qt, bias)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)
    if threshold:   # the outliers matter: without them the result differs
        assert not torch.equal(ours, Bnb8Scheme(0.0).linear(x, qt, bias))


def test_linear_single_row_and_empty():
    w = weight((16, 32), torch.float16, seed=2)
    lin = bnb_layer(w, None, 6.0)
    qt = Bnb8Scheme().decode(dict(lin.state_dict()), shape=(16, 32))
    x = torch.randn(1, 32, dtype=torch.float16)
    x[0, 4] = 9.0
    with torch.no_grad():
        assert torch.equal(Bnb8Scheme().linear(x, qt, None), lin(x.clone()))
    assert Bnb8Scheme().linear(torch.empty(0, 32, dtype=torch.float16), qt, None).shape == (0, 16)


def test_int8_matmul_exact_past_float32_range():
    """in_features > 1040: a single float32 product would round the int32 sums; ours stays exact."""
    g = torch.Generator().manual_seed(0)
    a = torch.full((3, 3000), 127, dtype=torch.int8)
    b = torch.randint(-127, 128, (5, 3000), generator=g, dtype=torch.int8)
    b[0] = 127
    exact = (a.long() @ b.long().t())
    assert torch.equal(int8_matmul_exact(a, b).long(), exact)
    assert exact[0, 0] == 127 * 127 * 3000 and exact[0, 0] > 2 ** 24


def test_present_and_keys():
    s = Bnb8Scheme()
    assert not s.present({"weight", "bias"})
    assert s.present({"weight", "SCB", "weight_format"})
    assert s.present({"SCB"})
    assert s.keys("m.q") == ["m.q.weight", "m.q.SCB", "m.q.weight_format"]
    assert s.name == "bnb-int8"


def test_scheme_arguments():
    with pytest.raises(UnsupportedError, match="has_fp16_weights=True"):
        Bnb8Scheme(has_fp16_weights=True)
    with pytest.raises(ConfigError, match="threshold -1"):
        Bnb8Scheme(threshold=-1)
    with pytest.raises(UnsupportedError, match="2-D float"):
        Bnb8Scheme().quantize(torch.randn(4))


@pytest.fixture(scope="module")
def good():
    return Bnb8Scheme().quantize(weight((96, 256), torch.float16, seed=4)).encode()


BAD = {
    "weight_format col32": (lambda p: {**p, "weight_format": torch.tensor(1, dtype=torch.uint8)}, UnsupportedError,
                            "weight_format", "'col32'"),
    "weight_format col_ampere": (lambda p: {**p, "weight_format": torch.tensor(3, dtype=torch.uint8)},
                                 UnsupportedError, "weight_format", "'col_ampere'"),
    "weight_format unknown": (lambda p: {**p, "weight_format": torch.tensor(9, dtype=torch.uint8)}, QuantStateError,
                              "weight_format", "weight_format 9 is unknown"),
    "weight_format not a scalar": (lambda p: {**p, "weight_format": torch.zeros(2, dtype=torch.uint8)},
                                   QuantStateError, "weight_format", "uint8 scalar"),
    "missing SCB": (lambda p: {k: v for k, v in p.items() if k != "SCB"}, MissingTensorError, "SCB", "missing 'SCB'"),
    "SCB without weight": (lambda p: {k: v for k, v in p.items() if k != "weight"}, MissingTensorError, "weight",
                           "missing 'weight'"),
    "weight not int8": (lambda p: {**p, "weight": p["weight"].half()}, ShapeMismatchError, "weight",
                        "dtype float16, expected int8"),
    "weight not 2-D": (lambda p: {**p, "weight": p["weight"].view(-1)}, ShapeMismatchError, "weight",
                       "expected [out_features, in_features]"),
    "SCB length": (lambda p: {**p, "SCB": p["SCB"][:95]}, ShapeMismatchError, "SCB", "expected [96]"),
    "SCB dtype": (lambda p: {**p, "SCB": p["SCB"].half()}, ShapeMismatchError, "SCB", "expected float32"),
    "model shape": (lambda p: {**p, "weight": p["weight"][:, :128], "SCB": p["SCB"]}, ShapeMismatchError, "weight",
                    "expected [96, 256]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, good):
    mutate, kind, suffix, fragment = BAD[case]
    with pytest.raises(kind) as e:
        Bnb8Scheme().decode(mutate(dict(good)), shape=(96, 256), file="model.safetensors", prefix="m.fc")
    assert fragment in str(e.value)
    assert e.value.file == "model.safetensors" and e.value.key == "m.fc." + suffix


def test_weight_format_optional(good):
    qt = Bnb8Scheme().decode({"weight": good["weight"], "SCB": good["SCB"]}, shape=(96, 256))
    assert torch.equal(qt.encode()["weight_format"], torch.tensor(0, dtype=torch.uint8))
