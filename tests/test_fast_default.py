"""Fast is the default, exact is a switch (issue #10): the packed kernels every format gets, the exact
switch's bit-for-bit promise, the load report's kernel entries, quantize_lm_head, and the fidelity bar
on real SmolLM2 (slow)."""
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import quantload
from quantload.ggml_types import GGML_TYPES
from quantload.runtime import kernels
from quantload.runtime.modules import QEmbedding, QLinear, qtensors_of
from quantload.schemes.affine import ct_config
from quantload.schemes.gguf.dequant import dequantize_blocks
from quantload.schemes.gguf.kquants import affine_k
from quantload.schemes.gguf.samples import random_blocks
from quantload.schemes.gguf.scheme import gguf_scheme

SRC = str(pathlib.Path(quantload.__file__).resolve().parents[1])
TYPE_ID = {t.name: t.id for t in GGML_TYPES.values()}


@pytest.fixture(autouse=True)
def fast_default():
    previous = quantload.set_exact(False)
    yield
    quantload.set_exact(previous)


def _gguf_weight(name: str, n_out: int = 48, n_in: int = 512, seed: int = 0):
    t = GGML_TYPES[TYPE_ID[name]]
    blocks = random_blocks(t.id, n_out * n_in // t.block_size, seed).reshape(n_out, -1)
    scheme = gguf_scheme(t.id)
    return scheme, scheme.decode({"weight": blocks.reshape(-1)}, shape=(n_out, n_in))


def _bound(x, w, rowmax_step=None):
    """|y_fast - y| per element: 2^-7 (|x| @ |W|^T) for the bfloat16 roundings (see test_fast_kernels),
    plus |x| @ (half an int8 step of each row) for a requantized weight."""
    x64, w64 = x.double(), w.double()
    b = 2.0 ** -7 * (x64.abs() @ w64.abs().T)
    if rowmax_step is not None:
        b += x64.abs().sum(-1, keepdim=True) * rowmax_step.T
    return x64 @ w64.T, b


# --- GGUF K-quants and i-quants on packed kernels ---------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_q4_k_and_q5_k_are_exactly_affine_at_group_32(name):
    """W = codes * (d * sc) - dmin * m per 32-element sub-block, the decoder's float32 arithmetic."""
    t = GGML_TYPES[TYPE_ID[name]]
    b = random_blocks(t.id, 64, seed=t.id)
    codes, bits, scale, bias = affine_k(t.id, b)
    assert bits == (4 if name == "Q4_K" else 5) and int(codes.max()) < 2 ** bits
    rebuilt = (codes.view(64, 8, 32).float() * scale.unsqueeze(-1) + bias.unsqueeze(-1)).view(64, 256)
    assert torch.equal(rebuilt, dequantize_blocks(t.id, b))


@pytest.mark.parametrize("name, kind", [("Q4_K", "int4pack g32"), ("Q5_K", "int4pack g32 x2 planes"),
                                        ("Q6_K", "int8pack rows x2 planes"), ("Q3_K", "int8pack rows x2 planes"),
                                        ("Q2_K", "int8pack rows x2 planes"), ("IQ4_NL", "int8pack rows x2 planes"),
                                        ("IQ4_XS", "int8pack rows x2 planes"), ("IQ3_S", "int8pack rows x2 planes"),
                                        ("IQ2_XXS", "int8pack rows x2 planes")])
def test_gguf_types_take_a_packed_kernel_within_tolerance(name, kind):
    scheme, qt = _gguf_weight(name)
    prepared = scheme.prepare_runtime(qt)
    kernel = kernels.packed_kernel(prepared)
    assert kernel.describe() == kind
    choice = kernels.choice_of(prepared)
    assert choice.kernel == kind and set(choice.not_taken) == {"int4pack", "int8pack"} - {kind.split()[0]}
    assert torch.equal(prepared.encode()["weight"], qt.encode()["weight"])       # blocks untouched
    w = qt.dequantize(torch.float32)
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1))
    y = scheme.linear(x, prepared, None)
    assert torch.equal(y, kernel(x, None))
    step = w.abs().amax(1, keepdim=True).double() / 127 * (1 + 2.0 ** -7) / 2 if kernel.requantized else None
    ref, bound = _bound(x, w, step)
    assert bool(((y.double() - ref).abs() <= bound).all())


def test_int8_rows_read_the_exact_rows_a_chunk_at_a_time(monkeypatch):
    """The requantization decodes a GGUF weight a chunk of rows at a time (bounded temporaries) and gets
    the same codes as from the whole weight; row order (llama q/k) is honoured."""
    monkeypatch.setattr(kernels, "PACK_CHUNK_ELEMS", 512 * 5)       # 5 rows a chunk
    scheme, qt = _gguf_weight("Q6_K", n_out=23)
    whole = kernels.int8_rows(23, 512, lambda r0, r1: qt.dequantize(torch.float32)[r0:r1].clone())
    chunked = kernels.packed_kernel(scheme.prepare_runtime(qt))
    assert torch.equal(chunked.weight, whole.weight) and torch.equal(chunked.scales, whole.scales)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    permuted = type(qt)(scheme, qt.data, qt.shape, qt.dtype, {**qt.meta, "row_order": order})
    pk = kernels.packed_kernel(scheme.prepare_runtime(permuted))
    assert torch.equal(pk.weight, whole.weight[order])


def test_plain_float_gguf_weights_stay_dense():
    scheme = gguf_scheme(TYPE_ID["F16"])
    qt = scheme.quantize(torch.randn(16, 64))
    prepared = scheme.prepare_runtime(qt)
    assert kernels.packed_kernel(prepared) is None and kernels.choice_of(prepared).kernel == "exact"


# --- exact=True is today's formula, bit for bit -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_untied")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def _layer_io(model, ids):
    """(module, input, output) of every quantized Linear in one forward."""
    seen, hooks = [], []
    for _, m in qtensors_of(model):
        if isinstance(m, QLinear):
            hooks.append(m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], out))))
    with torch.inference_mode():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("quantize", ["nf4", "int8", ct_config(4, group_size=32, symmetric=False)])
def test_exact_load_is_dequantize_then_linear_bit_for_bit(tiny_untied, quantize):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    exact = quantload.load(tiny_untied, quantize=quantize, dtype="float32", progress=False, exact=True)
    assert set(exact.load_report.kernel_counts()) == {"exact"}
    assert all(c.reason == "exact=True" for c in exact.load_report.kernels.values())
    logits, seen = _layer_io(exact, ids)
    assert len(seen) == 14
    for mod, x, y in seen:
        if type(mod.qweight.scheme).__name__ == "Bnb8Scheme":
            continue        # LLM.int8's exact path is its int8 matmul (bnb8.linear), not a dequantize
        ref = F.linear(x, mod.qweight.dequantize(x.dtype), None if mod.bias is None else mod.bias.to(x.dtype))
        assert torch.equal(y, ref)
    assert not any(kernels.FAST_KEY in m.qweight.meta for m, _, _ in seen)
    # the same checkpoint loaded fast computes differently, and the process switch makes it exact again
    fast = quantload.load(tiny_untied, quantize=quantize, dtype="float32", progress=False)
    with torch.inference_mode():
        fast_logits = fast(ids).logits
        # LLM.int8's fast path is its own algorithm on torch._int_mm: the same integers here (K <= 1024)
        assert torch.equal(fast_logits, logits) == (quantize == "int8")
        quantload.set_exact(True)
        assert torch.equal(fast(ids).logits, logits)
        assert torch.equal(exact(ids).logits, logits)
        quantload.set_exact(False)
        assert torch.equal(exact(ids).logits, logits)                 # loaded exact: stays exact


def test_quantload_exact_environment_variable_loads_exact(tiny_untied):
    code = ("import quantload, torch; m = quantload.load(%r, quantize='nf4', dtype='float32', progress=False);"
            "m(torch.zeros(1, 2, dtype=torch.long)); print(sorted(m.load_report.kernel_counts()),"
            " quantload.exact_enabled())" % str(tiny_untied))
    for env, expected in (({"QUANTLOAD_EXACT": "1"}, "['exact'] True"), ({}, "['int8pack rows x2 planes'] False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}).stdout
        assert out.strip().splitlines()[-1] == expected, env


def test_report_kernels_are_typed_and_live(tiny_untied):
    model = quantload.load(tiny_untied, quantize=ct_config(4, group_size=16), dtype="float32", progress=False)
    report = model.load_report
    choice = report.kernels["model.layers.0.mlp.up_proj"]
    assert isinstance(choice, quantload.KernelChoice) and choice.kernel == "pending"
    with torch.inference_mode():
        model(torch.zeros(1, 3, dtype=torch.long))
    assert choice.kernel == "int8pack rows x2 planes"                          # the same object, resolved
    assert "group size 16" in choice.not_taken["int4pack"]
    assert "kernels: int8pack rows x2 planes x14" in str(report)


def test_quantize_lm_head_on_request(tiny_untied):
    default = quantload.load(tiny_untied, quantize="nf4", dtype="float32", progress=False)
    assert type(default.lm_head) is torch.nn.Linear                 # as transformers: left dense
    model = quantload.load(tiny_untied, quantize="nf4", dtype="float32", progress=False, quantize_lm_head=True)
    assert isinstance(model.lm_head, QLinear) and model.load_report.kernels["lm_head"].kernel == "pending"
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        q, d = model(ids).logits, default(ids).logits
        quantload.set_exact(True)
        q_exact = model(ids).logits
    assert model.load_report.kernels["lm_head"].kernel == "int8pack rows x2 planes"
    assert not torch.equal(q_exact, d)                               # the head is NF4 now
    assert (q - q_exact).abs().mean() < 0.02 * q_exact.std()    # bfloat16 activations in every layer


# --- the fidelity bar on real SmolLM2 (bench/fidelity.py measures the full 4096 tokens) -------------------
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf-q4_1", "nf4"])
def test_fidelity_bar_on_smollm2(fmt):
    """One teacher-forced window of 512 tokens of the GPL-3 text (the bench: 8 windows), the packed kernels
    at every position: perplexity within 1% of the exact path and top-1 agreement >= 98%. One load: the
    exact logits come from the same model under set_exact(True) (bit for bit an exact=True load, see
    test_exact_load_is_dequantize_then_linear_bit_for_bit)."""
    import realmodels
    path = realmodels.smollm2_gguf() if fmt.startswith("gguf") else realmodels.smollm2_bf16()
    kw = {} if fmt.startswith("gguf") else {"quantize": fmt}
    tok = quantload.load_tokenizer(path)
    ids = tok(open("/usr/share/common-licenses/GPL-3").read(), return_tensors="pt").input_ids[:, :512]
    model = quantload.load(path, progress=False, dtype="float32", **kw)
    with torch.inference_mode():
        with kernels.fast_at_any_rows():
            fast = model(ids).logits[0, :-1].float()
        quantload.set_exact(True)
        exact = model(ids).logits[0, :-1].float()
    counts = model.load_report.kernel_counts()
    assert "exact" not in counts and "pending" not in counts, counts
    target = ids[0, 1:]
    ppl = {k: math.exp(F.cross_entropy(v, target).item()) for k, v in (("fast", fast), ("exact", exact))}
    top1 = (fast.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(fmt, counts, ppl, f"top-1 {top1:.4f}")
    assert abs(ppl["fast"] / ppl["exact"] - 1) <= 0.01 and top1 >= 0.98


def test_cli_generate_has_an_exact_flag():
    from quantload.cli import build_parser
    assert build_parser().parse_args(["generate", "--prompt", "hi", "--exact"]).exact is True
    assert build_parser().parse_args(["generate", "--prompt", "hi"]).exact is False
