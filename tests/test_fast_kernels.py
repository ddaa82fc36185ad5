"""The packed-kernel fast path (runtime/kernels.py): which weights take it, that repacking leaves the
checkpoint bytes and the exact path untouched, and how far its bfloat16 numerics are from the exact path.

Tolerance of the fast path, per output element, against float64 x @ W^T with W the exact weight:
    |y_fast - y| <= 2^-7 * (|x| @ |W|^T) (+ grid * (|x| @ absmax^T) for NF4/FP4)
The kernel rounds the input, the scales and zero offsets to bfloat16 (each 2^-9 relative; a zero
offset is at most a few times the group's weights: the balanced digits keep it there), accumulates in
float32 and rounds the output to bfloat16 (2^-9 of |y| <= |x| @ |W|^T); 2^-7 covers the four.
NF4/FP4 add their table's rounding to the integer grid: half a grid step times the block absmax.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import quantload
from quantload.runtime import kernels
from quantload.runtime.modules import QLinear, qtensors_of
from quantload.schemes import bnb4
from quantload.schemes.affine import WeightArgs, ct_config
from quantload.schemes.compressed import CTPackedScheme
from quantload.schemes.gguf.scheme import gguf_scheme
from quantload.schemes.gptq import GPTQScheme
from quantload.schemes.intpack import pack_stream, packed_len

SRC = str(pathlib.Path(quantload.__file__).resolve().parents[1])   # this checkout, for subprocesses

# fixture -> the kernel it must get
FIXTURE_KERNELS = {
    "awq_gemm_b4_g128": "int4pack g128",
    "ct_pack_b2_group64_sym": "int4pack g64",
    "ct_pack_b4_group128_sym": "int4pack g128",
    "ct_pack_b4_group32_asym": "int4pack g32",
    "ct_pack_b8_channel_sym": "int8pack",
    "gptq_v1_b2_g64_asym_descact_ZERO0_OVERFLOW": "int4pack g64",
    "gptq_v1_b4_g128_asym": "int4pack g128",
    "gptq_v1_b4_g128_sym": "int4pack g128",
    "gptq_v1_b8_g-1_sym": "int8pack",
    "bnb_nf4_dq_96x256_bfloat16": "int8pack rows x2 planes",
    "bnb_nf4_nodq_96x256_bfloat16": "int8pack rows x2 planes",
    "bnb_fp4_nodq_96x256_bfloat16": "int8pack rows x2 planes",
    "hqq_b4_g64_axis1": "int4pack g64",
    "hqq_b2_g64_axis0": "int8pack rows x2 planes",
    "quanto_qint4": "int4pack g128",
    "quanto_qint8": "int8pack",
}
NOT_ELIGIBLE = {"bnb_nf4_nodq_7x9_float16": "do not tile the rows"}


@pytest.fixture(autouse=True)
def fast_on():
    previous = quantload.set_exact(False)
    yield
    quantload.set_exact(previous)


def _fixture_qtensor(fixtures_dir, name):
    j = json.loads((fixtures_dir / f"{name}.json").read_text())
    qc = j.get("quantization_config") or j.get("quantize_config")
    if qc is not None:
        qc = {"quant_method": "gptq", **qc}
    elif name.startswith("quanto"):
        qc = {"quant_method": "quanto", "weights": j["quanto_qmap"]["layer"]["weights"]}
    elif name.startswith("hqq"):
        qc = {"quant_method": "hqq"}
    elif name.startswith("bnb_int8"):
        qc = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    else:
        qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": j["quant_type"],
              "bnb_4bit_use_double_quant": j["double_quant"]}
    sd = quantload.read_state_dict(fixtures_dir / f"{name}.safetensors", quantization_config=qc)
    return sd["layer.weight"]


def _grid_error(qt, kernel=None) -> torch.Tensor | None:
    """NF4/FP4 (and every weight the int8 kernel takes requantized) are requantized to int8 per row:
    half a step, the row's largest |w| (NF4/FP4: block absmax) / 127 rounded up to a bfloat16 (at most
    2^-7 more), per weight; else None."""
    if isinstance(qt.scheme, bnb4.Bnb4Scheme):
        rowmax = qt.scheme.block_absmax(qt).double().view(qt.shape[0], -1).amax(1, keepdim=True)
    elif kernel is not None and kernel.requantized:
        rowmax = qt.dequantize(torch.float32).double().abs().amax(1, keepdim=True)
    else:
        return None
    return (rowmax / 127 * (1 + 2.0 ** -7) / 2).expand(qt.shape)


def assert_within_tolerance(y_fast, x, w, grid=None):
    """The module docstring's bound, per element."""
    x64, w64 = x.double().reshape(-1, x.shape[-1]), w.double()
    ref = x64 @ w64.T
    bound = 2.0 ** -7 * (x64.abs() @ w64.abs().T)
    if grid is not None:
        bound += x64.abs() @ grid.T
    err = (y_fast.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), f"worst error/bound {(err / bound).max().item():.3f}"
    return (err.norm() / ref.norm()).item()


def assert_kernel_weight_matches(kernel, w, grid=None, factor=1.0):
    """The weight the kernel multiplies by, read back through an identity input (one product per sum:
    exact, then the output's bfloat16 rounding), against the exact weight: within 2^-6 of the row's
    largest |w| m, plus the grid error for NF4/FP4. The roundings of the scale (2^-9 relative, times
    codes at most ~8 steps from the zero), of the zero offset (at most ~8 steps) and of the output
    (2^-9 |w|) stay below 3 * 2^-9 * m when m spans ~8 steps (measured: up to 0.78 * 2^-7 * m). A code
    in the wrong place, a wrong zero point or a lost permutation is off by at least one step (~m / 8
    for 4-bit codes), 8x the bound."""
    seen = kernel(torch.eye(w.shape[1]), None).T.double()
    bound = factor * 2.0 ** -6 * w.double().abs().amax(1, keepdim=True) + (0 if grid is None else grid)
    err = (seen - w.double()).abs()
    assert bool((err <= bound).all()), f"worst error/bound {(err / bound).max().item():.3f}"


# --- fixtures of every packed format -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FIXTURE_KERNELS))
def test_fixture_packs_keeps_bytes_and_stays_close(fixtures_dir, name):
    qt = _fixture_qtensor(fixtures_dir, name)
    before = {k: v.clone() for k, v in qt.encode().items()}
    w = qt.dequantize(torch.float32)
    prepared = qt.scheme.prepare_runtime(qt)
    kernel = kernels.packed_kernel(prepared)
    assert kernel.describe() == FIXTURE_KERNELS[name]
    # the checkpoint bytes and the exact weight are untouched
    after = prepared.encode()
    assert list(after) == list(before)
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert torch.equal(prepared.dequantize(torch.float32), w)
    x = torch.randn(2, 3, qt.shape[1], generator=torch.Generator().manual_seed(0))
    bias = torch.randn(qt.shape[0], generator=torch.Generator().manual_seed(1))
    y = prepared.scheme.linear(x, prepared, bias)
    assert y.shape == (2, 3, qt.shape[0]) and y.dtype == torch.float32
    assert torch.equal(y, kernel(x, bias))                 # the scheme's linear ran the kernel
    # quanto's float shift (W = s * q - shift) puts the zero point outside the codes' range in groups of
    # one sign: the kernel's zero offset is then more than ~8 steps, and its bfloat16 rounding (2^-9 of
    # it) is added to the bound
    grid = _grid_error(qt, kernel)
    if name == "quanto_qint4":
        zero = kernel.scales_zeros[:, : qt.shape[0], 1].double().abs().T.repeat_interleave(kernel.group, 1)
        grid = 2.0 ** -9 * zero[:, : qt.shape[1]]
    assert_within_tolerance(y - bias, x, w, grid)
    assert_kernel_weight_matches(kernel, w, grid, factor=2.0 if name == "quanto_qint4" else 1.0)


@pytest.mark.parametrize("name", sorted(NOT_ELIGIBLE))
def test_formats_without_a_kernel_keep_the_exact_path(fixtures_dir, name):
    qt = _fixture_qtensor(fixtures_dir, name)
    prepared = qt.scheme.prepare_runtime(qt)
    assert kernels.packed_kernel(prepared) is None and kernels.FAST_KEY not in prepared.meta
    if NOT_ELIGIBLE[name]:
        assert NOT_ELIGIBLE[name] in prepared.meta[kernels.SKIP_KEY]
    x = torch.randn(3, qt.shape[1])
    assert torch.equal(prepared.scheme.linear(x, prepared, None), qt.scheme.linear(x, qt, None))


def test_llm_int8_fast_path_is_its_own_algorithm_on_int_mm(fixtures_dir):
    """LLM.int8 keeps int8 activations and outlier columns; torch._int_mm gives the exact int32 product,
    so the output is the exact path's wherever that path is exact too (AVX-512, or in_features <= 1024
    where float32 runs are exact integers: this fixture)."""
    from quantload.schemes import bnb8
    qt = _fixture_qtensor(fixtures_dir, "bnb_int8_96x256_float16")
    prepared = qt.scheme.prepare_runtime(qt)
    assert prepared.meta.get(bnb8.INT_MM_KEY) and kernels.choice_of(prepared).kernel == "int_mm"
    assert "92.2%" in kernels.choice_of(prepared).not_taken["int8pack"]
    x = torch.randn(2, 5, qt.shape[1], generator=torch.Generator().manual_seed(0)) * 3   # some outliers
    with torch.inference_mode():
        fast = prepared.scheme.linear(x, prepared, None)
        quantload.set_exact(True)
        exact = prepared.scheme.linear(x, prepared, None)
    assert torch.equal(fast, exact) and torch.equal(exact, qt.scheme.linear(x, qt, None))


# --- the switch and the dispatch rules ---------------------------------------------------------------
def _ct_int4(n_out=48, n_in=256, group=64, symmetric=False, seed=0):
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed))
    scheme = CTPackedScheme(WeightArgs(4, "int", symmetric, "group", group))
    return scheme, scheme.quantize(w)


def test_switch_restores_the_exact_path_bit_for_bit():
    scheme, qt = _ct_int4()
    mod = QLinear(qt.shape[1], qt.shape[0], True, scheme)
    mod.bias = torch.nn.Parameter(torch.randn(qt.shape[0]), requires_grad=False)
    mod.set_qweight(scheme.prepare_runtime(qt))
    x = torch.randn(1, 4, qt.shape[1])
    exact = F.linear(x, qt.dequantize(torch.float32), mod.bias)
    with torch.inference_mode():
        fast = mod(x)
        assert not torch.equal(fast, exact)                 # bfloat16 kernel: not the same bits
        assert quantload.set_exact(True) is False
        assert quantload.exact_enabled()
        assert torch.equal(mod(x), exact)
        quantload.set_exact(False)
        assert torch.equal(mod(x), fast)
        # the deprecated switch still works (bench/ and scripts/gpu_check.py call it)
        assert kernels.set_fast_kernels(False) is True and torch.equal(mod(x), exact)
        assert kernels.set_fast_kernels(True) is False and torch.equal(mod(x), fast)


def test_loads_while_switched_off_do_not_repack():
    scheme, qt = _ct_int4()
    quantload.set_exact(True)
    prepared = scheme.prepare_runtime(qt)
    assert not {kernels.FAST_KEY, kernels.SKIP_KEY, kernels.PENDING_KEY} & set(prepared.meta)
    assert kernels.choice_of(prepared).kernel == "exact"
    quantload.set_exact(False)
    x = torch.randn(2, qt.shape[1])
    assert torch.equal(scheme.linear(x, prepared, None), F.linear(x, qt.dequantize(torch.float32)))


def test_on_by_default_and_exact_by_environment():
    code = "import quantload.runtime.kernels as k; print(k.fast_kernels_enabled())"
    for env, expected in (({}, "True"), ({"QUANTLOAD_FAST_KERNELS": "1"}, "True"),
                          ({"QUANTLOAD_FAST_KERNELS": "0"}, "False"),
                          ({"QUANTLOAD_FAST_KERNELS": "1", "QUANTLOAD_EXACT": "1"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected, env


def test_environment_variable_starts_exact():
    code = "import quantload.runtime.kernels as k; print(k.fast_kernels_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env={"QUANTLOAD_EXACT": "1", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_large_batches_grad_and_other_devices_take_the_exact_path():
    scheme, qt = _ct_int4()
    prepared = scheme.prepare_runtime(qt)
    w = qt.dequantize(torch.float32)
    big = torch.randn(kernels.MAX_FAST_ROWS + 1, qt.shape[1])
    assert kernels.fast_linear(big, prepared, None) is None
    assert torch.equal(scheme.linear(big, prepared, None), F.linear(big, w))
    small = torch.randn(kernels.MAX_FAST_ROWS, qt.shape[1])
    assert kernels.fast_linear(small, prepared, None) is not None
    two_planes = gguf_scheme(8).prepare_runtime(gguf_scheme(8).quantize(torch.randn(32, 64)))
    assert kernels.packed_kernel(two_planes).max_rows == kernels.MAX_FAST_ROWS // 2
    assert kernels.fast_linear(torch.randn(kernels.MAX_FAST_ROWS // 2 + 1, 64), two_planes, None) is None
    needs_grad = torch.randn(2, qt.shape[1], requires_grad=True)
    assert kernels.fast_linear(needs_grad, prepared, None) is None
    assert kernels.fast_linear(torch.randn(2, qt.shape[1], device="meta"), prepared, None) is None
    meta_qt = qt.to("meta")
    assert scheme.prepare_runtime(meta_qt) is meta_qt


# --- shapes and groups ------------------------------------------------------------------------------------
def test_group_sizes_the_int4_kernel_cannot_take_are_requantized_to_int8():
    scheme, qt = _ct_int4(group=16)
    prepared = scheme.prepare_runtime(qt)
    kernel = kernels.packed_kernel(prepared)
    assert kernel.describe() == "int8pack rows x2 planes"
    choice = kernels.choice_of(prepared)
    assert choice.kernel == "int8pack rows x2 planes"
    assert "group size 16 is not a multiple of 32" in choice.not_taken["int4pack"]
    x = torch.randn(2, qt.shape[1])
    w = qt.dequantize(torch.float32)
    assert_within_tolerance(scheme.linear(x, prepared, None), x, w, _grid_error(qt, kernel))


@pytest.mark.parametrize("n_out, n_in, group, kind", [
    (24, 256, 64, "int4pack g64"),        # outputs padded to a multiple of 16
    (48, 200, 64, "int4pack g64"),        # GPTQ's partial last group: inputs padded with zeros
    (32, 1024, 512, "int4pack g256"),     # a large group repeats its scale
    (32, 96, -1, "int4pack g32"),         # per channel: one group, the widest kernel group dividing it
    (32, 300, -1, "int4pack g256"),       # per channel, inputs padded to the kernel group
])
def test_gptq_shapes_and_groups(n_out, n_in, group, kind):
    g = torch.Generator().manual_seed(n_in)
    gs = n_in if group == -1 else group
    ng = -(-n_in // gs)
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 15, (ng, n_out), generator=g)           # v1 stores z - 1
    scales = (torch.rand(ng, n_out, generator=g) / 10 + 0.01).half()
    pieces = {"qweight": pack_stream(q, 4, dim=0), "qzeros": pack_stream(z, 4, dim=1), "scales": scales}
    assert pieces["qweight"].shape == (packed_len(n_in, 4), n_out)
    scheme = GPTQScheme(4, group, sym=False)
    qt = scheme.decode(pieces, shape=(n_out, n_in))
    prepared = scheme.prepare_runtime(qt)
    assert kernels.packed_kernel(prepared).describe() == kind
    x = torch.randn(5, n_in, generator=g)
    assert_within_tolerance(scheme.linear(x, prepared, None), x, qt.dequantize(torch.float32))
    assert_kernel_weight_matches(kernels.packed_kernel(prepared), qt.dequantize(torch.float32))


def test_gptq_act_order_permutes_the_inputs():
    n_out, n_in, gs = 32, 128, 32
    g = torch.Generator().manual_seed(3)
    g_idx = (torch.randperm(n_in, generator=g) // gs).to(torch.int32)     # desc_act: groups scattered
    q = torch.randint(0, 16, (n_in, n_out), generator=g)
    z = torch.randint(0, 15, (n_in // gs, n_out), generator=g)
    scales = (torch.rand(n_in // gs, n_out, generator=g) / 10 + 0.01).half()
    scheme = GPTQScheme(4, gs, sym=False, desc_act=True)
    qt = scheme.decode({"qweight": pack_stream(q, 4, dim=0), "qzeros": pack_stream(z, 4, dim=1), "scales": scales,
                        "g_idx": g_idx}, shape=(n_out, n_in))
    prepared = scheme.prepare_runtime(qt)
    assert kernels.packed_kernel(prepared).perm is not None
    x = torch.randn(3, n_in, generator=g)
    assert_within_tolerance(scheme.linear(x, prepared, None), x, qt.dequantize(torch.float32))
    assert_kernel_weight_matches(kernels.packed_kernel(prepared), qt.dequantize(torch.float32))
    # a g_idx that does not give every group `gs` columns cannot be permuted into contiguous groups
    bad = g_idx.clone()
    bad[bad == 1] = 0
    qt_bad = scheme.decode({**{k: v for k, v in qt.data.items() if k != "g_idx"}, "g_idx": bad}, shape=(n_out, n_in))
    bad_prepared = scheme.prepare_runtime(qt_bad)
    assert kernels.packed_kernel(bad_prepared).describe() == "int8pack rows x2 planes"      # the exact weight, requantized
    assert "does not put 32 input columns in each group" in kernels.choice_of(bad_prepared).not_taken["int4pack"]


@pytest.mark.parametrize("type_name, kind", [("Q4_0", "int4pack g32"), ("Q4_1", "int4pack g32"),
                                             ("Q5_0", "int4pack g32 x2 planes"), ("Q5_1", "int4pack g32 x2 planes"),
                                             ("Q8_0", "int4pack g32 x2 planes")])
def test_gguf_legacy_blocks(type_name, kind):
    from quantload.ggml_types import GGML_TYPES
    type_id = next(t.id for t in GGML_TYPES.values() if t.name == type_name)
    scheme = gguf_scheme(type_id)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(type_id))
    qt = scheme.quantize(w)
    prepared = scheme.prepare_runtime(qt)
    assert kernels.packed_kernel(prepared).describe() == kind
    assert torch.equal(prepared.encode()["weight"], qt.encode()["weight"])
    x = torch.randn(4, 128)
    assert_within_tolerance(scheme.linear(x, prepared, None), x, qt.dequantize(torch.float32))
    assert_kernel_weight_matches(kernels.packed_kernel(prepared), qt.dequantize(torch.float32))



# --- a tiny model end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("quantize, kind", [(ct_config(4, group_size=32, symmetric=False), "int4pack g32"),
                                            ("nf4", "int8pack rows x2 planes")])
def test_tiny_model_logits_fast_vs_exact(tiny_checkpoint, quantize, kind):
    model = quantload.load(tiny_checkpoint, quantize=quantize, dtype="float32", progress=False)
    linears = [m for _, m in qtensors_of(model) if isinstance(m, QLinear)]
    assert len(linears) == 14                                # 7 per layer; lm_head is left dense
    assert not any(kernels.FAST_KEY in m.qweight.meta for m in linears)    # repacked on first use
    assert set(model.load_report.kernel_counts()) == {"pending"}
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))   # <= max_rows: fast
    with torch.inference_mode():
        fast = model(ids).logits
        assert {m.qweight.meta[kernels.FAST_KEY].describe() for m in linears} == {kind}
        assert model.load_report.kernel_counts() == {kind: 14}        # the report's live entries
        quantload.set_exact(True)
        exact = model(ids).logits
    d = (fast - exact).abs()
    # measured: mean |diff| ~1e-3 of the logits' spread; printed for the record (pytest -s)
    print(f"{kind}: max |diff| {d.max():.2e}, mean {d.mean():.2e}, logits std {exact.std():.2e}")
    assert d.mean() < 0.01 * exact.std()
    assert d.max() < 0.1 * exact.std()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype(dtype):
    scheme, qt = _ct_int4(symmetric=True)
    prepared = scheme.prepare_runtime(qt)
    x = torch.randn(3, qt.shape[1]).to(dtype)
    y = scheme.linear(x, prepared, None)
    assert y.dtype == dtype and torch.equal(y, kernels.packed_kernel(prepared)(x, None))
    assert_within_tolerance(y, x, qt.dequantize(torch.float32))


# --- lazy repacking, memory accounting -------------------------------------------------------------------
def test_repacked_on_first_use_only():
    scheme, qt = _ct_int4()
    prepared = scheme.prepare_runtime(qt)
    assert kernels.PENDING_KEY in prepared.meta and kernels.FAST_KEY not in prepared.meta   # load: no copy
    moved = prepared.to("cpu")              # a module move: a new QTensor, its meta copied shallowly
    x = torch.randn(2, qt.shape[1])
    y = scheme.linear(x, moved, None)
    kernel = moved.meta[kernels.FAST_KEY]
    assert kernels.PENDING_KEY not in moved.meta and kernel.describe() == "int4pack g64"
    assert torch.equal(y, kernel(x, None))
    assert kernels.PENDING_KEY in prepared.meta and kernels.packed_kernel(prepared) is kernel   # packed once
    assert kernel.nbytes == sum(t.numel() * t.element_size() for t in (kernel.packed, kernel.scales_zeros))


def test_nf4_int8_rows_two_planes_hold_the_residual():
    """w = s * (c1 + c2 / 128): within s / 256 (half a step of the residual plane) of the exact weight."""
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(5))
    scheme = bnb4.Bnb4Scheme("nf4", 64)
    qt = scheme.quantize(w)
    kernel = kernels.packed_kernel(scheme.prepare_runtime(qt))
    assert kernel.describe() == "int8pack rows x2 planes" and kernel.weight.shape == (40, 256)
    c1, c2 = kernel.weight[:, :128].double(), kernel.weight[:, 128:].double()
    s = kernel.scales.double().unsqueeze(1)
    err = (s * (c1 + c2 / 128) - qt.dequantize(torch.float32).double()).abs()
    assert bool((err <= s / 256 * (1 + 1e-6)).all()) and int(c2.abs().max()) <= 64
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    assert_within_tolerance(kernel(x, None), x, qt.dequantize(torch.float32), s.expand(40, 128) / 256)


def test_nf4_int8_rows_bound_and_bfloat16_scales(monkeypatch):
    monkeypatch.setattr(kernels, "INT8_ROW_PLANES", 1)      # one plane: the bound of the plain requantization
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(5))
    w[3] = 0                                                # an all-zero row
    w[7, :64] *= 100                                        # one large block: its row's scale grows
    scheme = bnb4.Bnb4Scheme("nf4", 64)
    qt = scheme.quantize(w)
    kernel = kernels.packed_kernel(scheme.prepare_runtime(qt))
    assert kernel.describe() == "int8pack rows" and kernel.weight.dtype == torch.int8
    exact = qt.dequantize(torch.float32).double()
    rowmax = scheme.block_absmax(qt).view(40, 2).amax(1).double()
    scale = kernel.scales.double()
    assert bool((scale >= rowmax / 127).all()) and bool((scale <= rowmax / 127 * (1 + 2.0 ** -7) + (rowmax == 0)).all())
    err = (kernel.weight.double() * scale.unsqueeze(1) - exact).abs()
    assert bool((err <= scale.unsqueeze(1) / 2 * (1 + 1e-6)).all())
    assert bool((kernel.weight[3] == 0).all()) and int(kernel.weight.abs().max()) == 127
    bad = scheme.prepare_runtime(scheme.quantize(torch.randn(4, 96)))      # 96 inputs: blocks of 64 straddle rows
    # ... so the int8 rows come from the exact weight instead of the block absmax
    assert kernels.packed_kernel(bad).describe() == "int8pack rows"
    assert "do not tile the rows" in kernels.choice_of(bad).not_taken["int4pack"]
    # the int8 kernel's short call (no bias, no permutation) is the general path, bit for bit
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(6))
    y = kernel(x, None)
    assert y.shape == (2, 3, 40) and torch.equal(y, kernels._Packed.__call__(kernel, x, None))
    xt = x.transpose(0, 1)                                  # a non-contiguous input, through the scheme
    assert torch.equal(scheme.linear(xt, scheme.prepare_runtime(qt), None), y.transpose(0, 1))


def test_the_repacked_copy_counts_in_the_weights_bytes(fast_on):
    scheme, qt = _ct_int4()
    packed_only = qt.nbytes
    prepared = scheme.prepare_runtime(qt)
    assert prepared.nbytes == packed_only                  # repacking waits for the first fast forward
    with torch.inference_mode():
        scheme.linear(torch.randn(1, qt.shape[1]), prepared, None)
    fast = prepared.meta[kernels.FAST_KEY]
    assert fast.nbytes > 0 and prepared.nbytes == packed_only + fast.nbytes
