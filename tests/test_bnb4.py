"""bitsandbytes NF4/FP4 scheme against bitsandbytes itself (CPU) and the golden fixtures: decode,
dequantize, quantize and encode are bit-exact; every malformed input raises the right error."""
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from quantload.errors import MissingTensorError, QuantStateError, ShapeMismatchError, UnsupportedError
from quantload.schemes import bnb4
from quantload.schemes.bnb4 import Bnb4Scheme, code_table, dynamic_map

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
DEFAULT_BACKEND = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
FIXTURES_4BIT = ["bnb_nf4_dq_96x256_bfloat16", "bnb_nf4_nodq_96x256_bfloat16", "bnb_nf4_nodq_7x9_float16",
                 "bnb_fp4_dq_96x256_bfloat16", "bnb_fp4_nodq_96x256_bfloat16", "bnb_fp4_dq_7x9_float16"]


@pytest.fixture(autouse=True, scope="module")
def _bnb_eager():
    # bnb wraps its odd-shape dequant fallback in torch.compile; eager gives the same bits, without minutes of compiling
    with torch._dynamo.config.patch(disable=True):
        yield


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def bnb_pieces(q, state):
    """What Linear4bit._save_to_state_dict writes for this weight (suffixes relative to the module)."""
    return {"weight": q, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}


def assert_same_pieces(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert ours[k].shape == theirs[k].shape, k
        assert torch.equal(bits(ours[k]), bits(theirs[k])), k


def random_weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    flat = w.view(-1)
    if flat.numel() >= 130:
        flat[64:128] = 0            # an all-zero full block (for blocksize 64)
    if flat.numel() % 64 and flat.numel() > 64:
        flat[-(flat.numel() % 64):] = 0   # an all-zero partial last block
    return w


def test_tables_are_bnbs():
    for qt in ("nf4", "fp4"):
        assert torch.equal(bits(code_table(qt)), bits(BF.get_4bit_type(qt, device="cpu")))
        _, order = bnb.backends.default.ops._get_4bit_quantize_bounds(qt, torch.device("cpu"))
        assert tuple(order.tolist()) == bnb4._BUCKET_TO_CODE[qt]
    assert torch.equal(bits(dynamic_map()), bits(BF.create_dynamic_map()))


@pytest.mark.parametrize("name", FIXTURES_4BIT)
def test_fixture_decodes_bit_exact_and_reencodes(name, fixtures_dir):
    stored = load_file(fixtures_dir / f"{name}.safetensors")
    expected = load_file(fixtures_dir / f"{name}.expected.safetensors")["layer.weight.dequantized"]
    pieces = {k.removeprefix("layer."): v for k, v in stored.items()}
    qt = Bnb4Scheme().decode(pieces, shape=expected.shape, file=name, prefix="layer")
    assert qt.dtype == expected.dtype and qt.shape == expected.shape
    assert qt.scheme.name == f"bnb-{name.split('_')[1]}"
    assert torch.equal(qt.dequantize(), expected)
    encoded = qt.encode()
    assert sorted(encoded) == sorted(pieces)
    assert_same_pieces({k: encoded[k] for k in pieces}, pieces)
    assert qt.nbytes == qt.scheme.nbytes_for(qt.shape, qt.dtype)


SHAPES = [(7, 9), (33, 65), (1, 1), (96, 256), (64, 128)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CASES = list(itertools.product(SHAPES, (64, 128, 4096), ("nf4", "fp4"), (False, True), DTYPES))


def check_nested_against_bnb(ours, state, absmax_f32):
    """Double-quant statistics: equal to bnb's pure-torch default backend; against bnb's CPU C++ kernel,
    whose 65536-bin lookup is approximate, each absmax code may differ but decodes to a value at most
    2^-15 (in units of the run's absmax) farther than the exact nearest code (bnb4 docstring)."""
    offset = absmax_f32.mean()
    assert ours.meta["nested_offset"] == state.offset.item() == offset.item()
    ref_codes, ref_nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        DEFAULT_BACKEND, absmax_f32 - offset, BF.create_dynamic_map(), 256)
    assert torch.equal(ours.data["absmax_codes"], ref_codes)
    assert torch.equal(bits(ours.data["nested_absmax"]), bits(ref_nested))
    cpu_codes, cpu_nested = state.absmax, state.state2.absmax
    if (cpu_nested == 0).any():   # a run of equal absmax values: C++ writes absmax 0 and code 0
        got = bnb4.dequantize_nested_absmax(ours.data["absmax_codes"], ours.data["nested_absmax"],
                                            ours.meta["nested_offset"], 256)
        assert torch.equal(got, BF.dequantize_blockwise(cpu_codes, state.state2) + state.offset)
        return
    assert torch.equal(bits(ours.data["nested_absmax"]), bits(cpu_nested))
    dyn = dynamic_map()
    scaled = ((absmax_f32 - offset) / cpu_nested.repeat_interleave(256)[: absmax_f32.numel()]).clamp(-1, 1)
    worse = (dyn[cpu_codes.long()] - scaled).abs() - (dyn[ours.data["absmax_codes"].long()] - scaled).abs()
    assert (worse <= 2 ** -15).all()


def case_id(c):
    (o, i), bs, qt, dq, dt = c
    return f"{o}x{i}-bs{bs}-{qt}-{'dq' if dq else 'nodq'}-{str(dt).removeprefix('torch.')}"


@pytest.mark.parametrize("shape,blocksize,quant_type,dq,dtype", CASES, ids=[case_id(c) for c in CASES])
def test_matches_bitsandbytes(shape, blocksize, quant_type, dq, dtype):
    w = random_weight(shape, dtype, seed=CASES.index((shape, blocksize, quant_type, dq, dtype)))
    q, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type=quant_type)
    theirs = bnb_pieces(q, state)
    scheme = Bnb4Scheme(quant_type, blocksize, dq)

    # bnb's bytes decode to bnb's dequantized weight, bit for bit, and re-encode to the same bytes
    decoded = scheme.decode(theirs, shape=shape, file="bnb", prefix="m")
    assert torch.equal(decoded.dequantize(), BF.dequantize_4bit(q, state))
    assert_same_pieces(decoded.encode(), theirs)

    # our quantizer writes bnb's bytes
    ours = scheme.quantize(w)
    assert ours.nbytes == scheme.nbytes_for(shape, dtype)
    assert torch.equal(ours.data["codes"], q.view(-1))
    if not dq:
        assert_same_pieces(ours.encode(), theirs)
        return
    _, plain = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    check_nested_against_bnb(ours, state, plain.absmax)
    encoded = ours.encode()
    for k in ("weight.absmax", "weight.nested_absmax", "weight.quant_state.bitsandbytes__" + quant_type):
        encoded.pop(k), theirs.pop(k)
    assert_same_pieces(encoded, theirs)


def test_nested_codes_exact_nearest_where_bnb_cpu_approximates():
    """The double-quant absmax codes: ours == bnb's default backend == exact nearest; bnb's CPU C++ lookup
    differs on a few codes, each within 2^-15 (of the run's absmax) of the exact nearest's distance."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(256 * 64, generator=g) * 3
    a = a - a.mean()
    ours, nested = bnb4._quantize_blockwise_dynamic(a)
    ref, ref_nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        DEFAULT_BACKEND, a, BF.create_dynamic_map(), 256)
    assert torch.equal(ours, ref) and torch.equal(nested, ref_nested)
    cpu, state = BF.quantize_blockwise(a, blocksize=256)
    assert torch.equal(state.absmax, nested)
    differ = int((cpu != ours).sum())
    assert 0 < differ < a.numel() // 100
    dyn = dynamic_map()
    scaled = (a.view(-1, 256) * (1.0 / nested).unsqueeze(1)).view(-1)   # as both quantizers scale
    worse = (dyn[cpu.long()] - scaled).abs() - (dyn[ours.long()] - scaled).abs()
    assert (worse >= 0).all() and (worse <= 2 ** -15).all()


@pytest.mark.parametrize("chunk", [64, 320, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_kernels_match_bnb(chunk, quant_type, monkeypatch):
    """Weights spanning many kernel chunks (the last one short) and a partial last block."""
    monkeypatch.setattr(bnb4, "_CPU_CHUNK", chunk)
    w = random_weight((33, 65), torch.bfloat16, seed=chunk)
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    ours = Bnb4Scheme(quant_type).quantize(w)
    assert torch.equal(ours.data["codes"], q.view(-1)) and torch.equal(ours.data["absmax"], state.absmax)
    assert torch.equal(ours.dequantize(), BF.dequantize_4bit(q, state))


def test_quant_state_json_is_bnbs_byte_for_byte():
    w = random_weight((96, 256), torch.bfloat16, seed=7)
    for dq in (False, True):
        q, state = BF.quantize_4bit(w, compress_statistics=dq, quant_type="nf4")
        ours = Bnb4Scheme("nf4", 64, dq).quantize(w).encode()["weight.quant_state.bitsandbytes__nf4"]
        theirs = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
        assert bytes(ours.tolist()) == bytes(theirs.tolist())


@pytest.mark.parametrize("quant_type,dq,storage", [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16),
                                                   ("nf4", False, torch.float32)])
def test_encode_equals_linear4bit_state_dict(quant_type, dq, storage):
    w = random_weight((96, 256), torch.bfloat16, seed=3)
    lin = bnb.nn.Linear4bit(256, 96, bias=False, compress_statistics=dq, quant_type=quant_type,
                            quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=dq, quant_type=quant_type,
                                   quant_storage=storage)
    sd = lin.to("cpu").state_dict()
    scheme = Bnb4Scheme(quant_type, 64, dq, quant_storage=storage)
    qt = scheme.decode(dict(sd), shape=(96, 256))
    assert qt.meta["quant_storage"] == storage
    assert_same_pieces(qt.encode(), dict(sd))
    ours = scheme.quantize(w).encode()
    assert ours["weight"].dtype == storage and ours["weight"].shape == sd["weight"].shape
    assert torch.equal(bits(ours["weight"]), bits(sd["weight"]))
    assert torch.equal(qt.dequantize(), BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state))


def test_codes_exact_near_every_threshold():
    """Values at, just below and just above each decision threshold, +-0 and subnormals quantize as bnb does
    (one block whose absmax is 1, so the scaled values are the values themselves)."""
    for qt in ("nf4", "fp4"):
        table = code_table(qt)
        ascending = table[list(bnb4._BUCKET_TO_CODE[qt])]
        mids = (ascending[:-1] + ascending[1:]) / 2
        probes = [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                  table, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e-45, -1e-45, 0.999999, -0.999999])]
        vals = torch.cat(probes)
        vals = torch.cat([vals, torch.zeros(-vals.numel() % 63)]).view(-1, 63)
        vals = torch.cat([torch.ones(vals.shape[0], 1), vals], 1).view(-1)   # each block starts with 1.0
        q, state = BF.quantize_4bit(vals, blocksize=64, quant_type=qt)
        assert (state.absmax == 1).all()
        assert torch.equal(Bnb4Scheme(qt).quantize(vals).data["codes"], q.view(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weights_quantize_as_bnb(dtype):
    """inf and NaN in full and partial blocks: same codes and absmax as bnb (NaN payloads aside: torch's
    own float16 -> float32 casts disagree on them)."""
    w = torch.randn(3, 50).to(dtype)
    flat = w.view(-1)
    flat[3], flat[70], flat[140], flat[145] = float("inf"), float("nan"), -float("inf"), float("nan")
    for qt in ("nf4", "fp4"):
        q, state = BF.quantize_4bit(w, blocksize=64, quant_type=qt)
        ours = Bnb4Scheme(qt).quantize(w)
        assert torch.equal(ours.data["codes"], q.view(-1))
        torch.testing.assert_close(ours.data["absmax"], state.absmax, rtol=0, atol=0, equal_nan=True)
        assert ours.data["absmax"].isnan().tolist() == [False, True, True]


LINEAR_CASES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.float16, torch.float32),
                (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)]


def linear4bit(w, bias, compute, packed_path: bool):
    """A Linear4bit holding w (nf4, double quant). `packed_path=False` keeps bnb on its generic path
    (dequantize, then F.linear) even where it would take its AVX512-BF16 kernel (the flag its forward reads)."""
    lin = bnb.nn.Linear4bit(256, 96, bias=True, compute_dtype=compute, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    lin = lin.to("cpu").eval()
    lin.support_avx512bf16_for_cpu = lin.support_avx512bf16_for_cpu and packed_path
    return lin


@pytest.mark.parametrize("x_dtype,compute", LINEAR_CASES)
def test_linear_matches_linear4bit(x_dtype, compute):
    """Ours equals Linear4bit's generic path bit for bit, on any CPU. That is the path bnb takes on CPUs
    without AVX512-BF16; where bnb has that kernel (has_avx512bf16()), see the next test."""
    w = random_weight((96, 256), torch.bfloat16, seed=11)
    bias = torch.randn(96, dtype=torch.bfloat16)
    lin = linear4bit(w, bias, compute, packed_path=False)
    scheme = Bnb4Scheme("nf4", 64, True, compute_dtype=compute)
    qt = scheme.decode({k: v for k, v in lin.state_dict().items() if k != "bias"}, shape=(96, 256))
    x = torch.randn(3, 5, 256).to(x_dtype)
    with torch.no_grad():
        theirs = lin(x)
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)   # bnb took its generic path
    ours = scheme.linear(x, qt, bias)
    assert ours.dtype == theirs.dtype == x_dtype
    assert torch.equal(ours, theirs)


def _round_like_bnb_packed_kernel(acc, x_dtype, compute, bias):
    """What Linear4bit.forward does after its bf16 kernel: kernel output bfloat16, cast to the compute
    dtype's input dtype, `+= bias` (bias cast to that dtype), then to the input dtype. Monotonic in acc."""
    mid = x_dtype if compute is None else compute
    out = acc.to(torch.bfloat16).to(mid)
    out = out + bias.to(mid)
    return out.to(x_dtype)


@pytest.mark.parametrize("x_dtype,compute", LINEAR_CASES)
def test_linear4bit_avx512bf16_kernel_against_its_own_math(x_dtype, compute):
    """Where bnb has its AVX512-BF16 kernel, Linear4bit.forward (eval, no grad) converts the weight with
    `_convert_weight_packed_for_cpu` (absmax: double quant undone, rounded to bfloat16, transposed) and
    runs `gemv_4bit_inference_cpu_nf4_bf16`: the input rounded to bfloat16, code (as bfloat16) x absmax
    (bfloat16), float32 accumulation, a bfloat16 result. The reference does the same math with exact
    (float64) accumulation; the kernel's own float32 summation order moves the sum by at most
    K * 2^-24 * sum|x*w|, which can change the final bfloat16 rounding by one step, and only that slack
    is allowed. Skipped (with the reason) on CPUs where bnb takes the generic path checked above."""
    if not BF.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bnb runs its generic path (test_linear_matches_linear4bit)")
    hub_kernel = getattr(bnb.backends.cpu.ops, "gemm_4bit_forward_kernel", None)
    if hub_kernel is not None:
        pytest.skip("bnb loaded the kernels-community gemm_4bit_forward kernel, whose math is not bnb's own")
    w = random_weight((96, 256), torch.bfloat16, seed=11)
    bias = torch.randn(96, dtype=torch.bfloat16)
    lin = linear4bit(w, bias, compute, packed_path=True)
    state = lin.weight.quant_state
    absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset   # what the conversion decodes
    codes = lin.weight.data.view(-1)
    nib = torch.stack([codes >> 4, codes & 15], 1).view(-1).long()
    table = BF.get_4bit_type("nf4", device="cpu").to(torch.bfloat16).double()
    wq = (table[nib].view(-1, 64) * absmax.to(torch.bfloat16).double().unsqueeze(1)).view(96, 256)
    x = torch.randn(3, 5, 256).to(x_dtype)
    with torch.no_grad():
        theirs = lin(x)
    assert lin.weight.quant_state.packing_format_for_cpu   # bnb took its packed AVX512-BF16 path
    xb = x.to(compute or x_dtype).to(torch.bfloat16).double()   # forward casts to compute, the kernel to bf16
    exact = xb @ wq.T
    slack = 256 * 2.0 ** -24 * (xb.abs() @ wq.abs().T)
    lo = _round_like_bnb_packed_kernel((exact - slack).float(), x_dtype, compute, bias)
    hi = _round_like_bnb_packed_kernel((exact + slack).float(), x_dtype, compute, bias)
    assert theirs.dtype == x_dtype
    assert ((theirs >= lo) & (theirs <= hi)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("dq", [False, True], ids=["nodq", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_as_bnb_saves_it_after_its_avx512bf16_forward(quant_type, dq, dtype):
    """Linear4bit.forward on an AVX512-BF16 CPU converts the weight with `_convert_weight_packed_for_cpu`;
    its save undoes that with `_convert_weight_packed_for_cpu_inverse`. Both are plain torch, so the state
    they leave is built here with bnb's own functions on any CPU. With double quant bnb re-quantizes the
    bfloat16-rounded absmax in the weight's dtype (nested_dtype that dtype): decoded bit-exact as bnb
    decodes it and re-encoded to the same bytes. Without, the absmax stays bfloat16 [K/blocksize, N]:
    repaired with a warning to the values bnb's kernel used, and never written back in that layout."""
    w = random_weight((96, 256), dtype, seed=21)
    q, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=quant_type)
    absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset if dq else state.absmax.clone()
    plain = BF.QuantState(absmax=absmax.to(torch.bfloat16).float(), shape=state.shape, code=state.code,
                          blocksize=64, quant_type=quant_type, dtype=dtype)
    expected = BF.dequantize_4bit(q, plain)                  # codes x the bfloat16 absmax bnb's kernel used
    packed, pstate = BF._convert_weight_packed_for_cpu(q.clone(), state)
    q2, state2 = BF._convert_weight_packed_for_cpu_inverse(packed, pstate)
    assert torch.equal(q2, q)
    pieces = bnb_pieces(q2, state2)
    blob = json.loads(bytes(pieces[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    qt = Bnb4Scheme().decode(dict(pieces), shape=(96, 256), file="m.safetensors", prefix="l")
    if dq:
        assert blob["nested_dtype"] == str(dtype).removeprefix("torch.")
        assert qt.meta["warnings"] == []
        assert torch.equal(qt.dequantize(), BF.dequantize_4bit(q2, state2))   # bnb reloads this one right
        assert_same_pieces(qt.encode(), pieces)
    else:
        assert pieces["weight.absmax"].dtype == torch.bfloat16 and pieces["weight.absmax"].shape == (4, 96)
        assert len(qt.meta["warnings"]) == 1 and "'l.weight.absmax'" in qt.meta["warnings"][0]
        assert "repaired" in qt.meta["warnings"][0]
        assert torch.equal(qt.dequantize(), expected)
        out = qt.encode()
        assert out["weight.absmax"].dtype == torch.float32 and out["weight.absmax"].shape == (384,)
        assert torch.equal(out["weight.absmax"], plain.absmax)


def test_bfloat16_absmax_of_another_shape_is_refused(good):
    """Only the exact packed layout is repaired: a bfloat16 absmax [N, K/blocksize] (not transposed) or a
    float32 2-D one is refused as before."""
    w = random_weight((96, 256), torch.bfloat16, seed=5)
    pieces = Bnb4Scheme("nf4", 64, False).quantize(w).encode()
    for bad in (pieces["weight.absmax"].view(96, 4).to(torch.bfloat16), pieces["weight.absmax"].view(4, 96)):
        with pytest.raises(ShapeMismatchError) as e:
            Bnb4Scheme().decode({**pieces, "weight.absmax": bad}, shape=(96, 256), file="f", prefix="p")
        assert e.value.key == "p.weight.absmax"


def test_present():
    s = Bnb4Scheme()
    assert not s.present({"weight"})
    assert not s.present({"weight", "bias"})
    assert s.present({"weight", "weight.quant_state.bitsandbytes__fp4"})
    assert s.present({"weight", "weight.absmax"})
    assert s.present({"weight.nested_absmax"})


def test_scheme_arguments_are_checked():
    with pytest.raises(UnsupportedError, match="quant_type 'int4'"):
        Bnb4Scheme("int4")
    with pytest.raises(UnsupportedError, match="blocksize 48"):
        Bnb4Scheme("nf4", 48)
    with pytest.raises(UnsupportedError, match="multiple of 4"):
        Bnb4Scheme("nf4", quant_storage=torch.float32).quantize(torch.randn(3, 3))
    with pytest.raises(UnsupportedError, match="float16, bfloat16 or float32"):
        Bnb4Scheme("nf4").quantize(torch.randn(4, 4, dtype=torch.float64))


# --- malformed inputs --------------------------------------------------------------------------------
QS = "weight.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def good():
    """A valid nf4 double-quant layer, 96x256 (384 blocks, 2 nested runs), pieces by suffix."""
    w = random_weight((96, 256), torch.bfloat16, seed=5)
    return Bnb4Scheme("nf4", 64, True).quantize(w).encode()


def with_json(pieces, **changes):
    d = json.loads(bytes(pieces[QS].tolist()))
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    out = dict(pieces)
    out[QS] = torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)
    return out


def drop(pieces, *suffixes):
    return {k: v for k, v in pieces.items() if k not in suffixes}


def rename_qs(pieces, new):
    out = drop(pieces, QS)
    out[new] = pieces[QS]
    return out


BAD = {
    "missing absmax": (lambda p: drop(p, "weight.absmax"), MissingTensorError, "weight.absmax",
                       "missing 'weight.absmax'"),
    "missing quant_map": (lambda p: drop(p, "weight.quant_map"), MissingTensorError, "weight.quant_map", "missing"),
    "weight without quant_state": (lambda p: drop(p, QS), MissingTensorError, QS, "without its quant_state"),
    "absmax without weight": (lambda p: drop(p, "weight"), MissingTensorError, "weight", "without their packed"),
    "malformed json": (lambda p: {**p, QS: torch.tensor(list(b'{"quant_type": "nf4", '), dtype=torch.uint8)},
                       QuantStateError, QS, "not valid UTF-8 JSON"),
    "json not an object": (lambda p: {**p, QS: torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)},
                           QuantStateError, QS, "expected an object"),
    "json blob not uint8": (lambda p: {**p, QS: p[QS].to(torch.int32)}, QuantStateError, QS, "1-D uint8"),
    "json contradicts key": (lambda p: with_json(p, quant_type="fp4"), QuantStateError, QS, "contradicts the key"),
    "json shape contradicts weight bytes": (lambda p: with_json(p, shape=[96, 255]), ShapeMismatchError, "weight",
                                            "12288 bytes"),
    "json shape not a list": (lambda p: with_json(p, shape="96x256"), QuantStateError, QS, "list of non-negative"),
    "json missing key": (lambda p: with_json(p, dtype=None), QuantStateError, QS, "missing ['dtype']"),
    "json unknown key": (lambda p: with_json(p, extra=1), QuantStateError, QS, "unknown ['extra']"),
    "json unsupported dtype": (lambda p: with_json(p, dtype="float64"), UnsupportedError, QS, "dtype 'float64'"),
    "unknown quant_type in json": (lambda p: with_json(p, quant_type="int4"), UnsupportedError, QS,
                                   "quant_type 'int4'"),
    "unknown quant_type in key": (lambda p: rename_qs(p, "weight.quant_state.bitsandbytes__int4"), UnsupportedError,
                                  "weight.quant_state.bitsandbytes__int4", "quant type 'int4'"),
    "unexpected quant_state entry": (lambda p: rename_qs(p, "weight.quant_state.other"), QuantStateError,
                                     "weight.quant_state.other", "unexpected quant_state entry"),
    "two quant_states": (lambda p: {**p, "weight.quant_state.bitsandbytes__fp4": p[QS]}, QuantStateError,
                         "weight.quant_state.bitsandbytes__fp4", "expected exactly one"),
    "blocksize unsupported": (lambda p: with_json(p, blocksize=48), UnsupportedError, QS, "blocksize 48"),
    "blocksize not an int": (lambda p: with_json(p, blocksize="64"), QuantStateError, QS, "positive integer"),
    "blocksize zero": (lambda p: with_json(p, blocksize=0), QuantStateError, QS, "positive integer"),
    "json blocksize contradicts absmax": (lambda p: with_json(p, blocksize=128), ShapeMismatchError,
                                          "weight.absmax", "expected [192]"),
    "absmax length": (lambda p: {**p, "weight.absmax": p["weight.absmax"][:-1]}, ShapeMismatchError,
                      "weight.absmax", "expected [384]"),
    "float absmax with double quant": (lambda p: {**p, "weight.absmax": p["weight.absmax"].float()},
                                       ShapeMismatchError, "weight.absmax", "expected uint8"),
    "nested_quant_map missing": (lambda p: drop(p, "weight.nested_quant_map"), MissingTensorError,
                                 "weight.nested_quant_map", "missing beside 'weight.nested_absmax'"),
    "nested_absmax missing": (lambda p: drop(p, "weight.nested_absmax"), MissingTensorError,
                              "weight.nested_absmax", "missing beside 'weight.nested_quant_map'"),
    "nested pieces missing": (lambda p: drop(p, "weight.nested_absmax", "weight.nested_quant_map"),
                              MissingTensorError, "weight.nested_absmax", "says double quant"),
    "nested pieces without nested json": (lambda p: with_json(p, nested_blocksize=None, nested_dtype=None,
                                                              nested_offset=None),
                                          QuantStateError, QS, "no nested_blocksize"),
    "nested json half present": (lambda p: with_json(p, nested_offset=None), QuantStateError, QS,
                                 "without ['nested_offset']"),
    "nested_dtype unsupported": (lambda p: with_json(p, nested_dtype="float64"), UnsupportedError, QS,
                                 "nested_dtype 'float64'"),
    "nested_dtype not a string": (lambda p: with_json(p, nested_dtype=32), UnsupportedError, QS,
                                  "nested_dtype 32"),
    "nested_blocksize huge": (lambda p: with_json(p, nested_blocksize=2 ** 40), UnsupportedError, QS,
                              "nested_blocksize 1099511627776"),
    "json nested 100000 deep": (lambda p: {**p, QS: torch.tensor(list(b"[" * 100_000 + b"]" * 100_000),
                                                                 dtype=torch.uint8)},
                                QuantStateError, QS, "nested too deeply"),
    "nested_offset not a number": (lambda p: with_json(p, nested_offset="0.5"), QuantStateError, QS,
                                   "finite number"),
    "nested_absmax length": (lambda p: {**p, "weight.nested_absmax": p["weight.nested_absmax"][:1]},
                             ShapeMismatchError, "weight.nested_absmax", "float32 [2]"),
    "nested_quant_map size": (lambda p: {**p, "weight.nested_quant_map": p["weight.nested_quant_map"][:255]},
                              ShapeMismatchError, "weight.nested_quant_map", "float32 [256]"),
    "quant_map size": (lambda p: {**p, "weight.quant_map": p["weight.quant_map"][:15]}, ShapeMismatchError,
                       "weight.quant_map", "expected float32 [16]"),
    "quant_map of the other type": (lambda p: {**p, "weight.quant_map": code_table("fp4")}, QuantStateError,
                                    "weight.quant_map", "not the standard NF4 table"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, good):
    mutate, kind, suffix, fragment = BAD[case]
    with pytest.raises(kind) as e:
        Bnb4Scheme().decode(mutate(good), shape=None, file="model.safetensors", prefix="model.layers.0.q")
    assert fragment in str(e.value)
    assert e.value.file == "model.safetensors"
    assert e.value.key == "model.layers.0.q." + suffix


def test_shape_argument_checked(good):
    with pytest.raises(ShapeMismatchError, match=r"quant_state shape \[96, 256\], but the model expects \[256, 96\]"):
        Bnb4Scheme().decode(good, shape=(256, 96), file="f", prefix="p")


def test_nonstandard_nested_map_is_kept_and_used(good):
    pieces = dict(good)
    pieces["weight.nested_quant_map"] = dynamic_map() * 0.5
    qt = Bnb4Scheme().decode(pieces, shape=(96, 256))
    assert torch.equal(qt.encode()["weight.nested_quant_map"], pieces["weight.nested_quant_map"])
    standard = Bnb4Scheme().decode(dict(good), shape=(96, 256))
    assert "nested_quant_map" not in standard.data
    half = bnb4.dequantize_nested_absmax(qt.data["absmax_codes"], qt.data["nested_absmax"], 0.0, 256,
                                        pieces["weight.nested_quant_map"])
    assert torch.equal(qt.scheme.block_absmax(qt), half + torch.tensor(qt.meta["nested_offset"]))
    assert math.isfinite(qt.meta["nested_offset"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_weight_matches_bnb(dtype):
    """Outputs past the huge-page threshold (kernels.empty_large, 4 MiB), several 1M-element chunks, an
    odd element count and a partial last block; float32 output is written without a scratch buffer."""
    w = random_weight((1537, 1031), dtype, seed=13)
    q, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = Bnb4Scheme("nf4").quantize(w)
    assert torch.equal(ours.data["codes"], q.view(-1)) and torch.equal(ours.data["absmax"], state.absmax)
    deq = ours.dequantize()
    assert deq.dtype == dtype and deq.is_contiguous() and torch.equal(deq, BF.dequantize_4bit(q, state))


def test_empty_large_is_a_plain_tensor():
    small = bnb4.kernels.empty_large(10, torch.int32, "cpu")
    large = bnb4.kernels.empty_large(3 << 20, torch.float32, "cpu")
    assert small.shape == (10,) and large.shape == (3 << 20,) and large.dtype == torch.float32
    large.fill_(1.5)                      # writable over its whole length (huge pages are advice only)
    assert float(large.sum()) == 1.5 * (3 << 20)
