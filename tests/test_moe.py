"""Mixture-of-experts models keep their experts quantized, one QTensor per expert per projection, and
compute only the experts the router picked.

Tiny random transformers models (2 layers, 4 experts, top-2, hidden 64) of Qwen2-MoE, Qwen3-MoE, Mixtral,
gpt-oss and MiniMax-M2 are written as the tools write them: transformers' own save_pretrained (per-expert keys,
Mixtral's block_sparse_moe names; gpt-oss fused), bitsandbytes' quantize_4bit per expert (the keys
transformers 4 + bitsandbytes wrote), compressed-tensors' own compressor, and GPTQ / AWQ packed by the
packers tests/test_gptq.py and tests/test_awq.py check against the tools' bytes. The reference is
transformers' own model (its fused experts) holding the tool's dequantized weights.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import quantload
from quantload.runtime.experts import QExperts
from quantload.runtime.modules import QLinear

sys.path.insert(0, os.path.dirname(__file__))
# the GPTQ / AWQ packers the scheme tests check against the tools' own bytes, and the tools' dequantization
# formulas (in the scales' float16, as AutoGPTQ's and AutoAWQ's torch paths compute)
from test_awq import _reference as awq_reference  # noqa: E402
from test_awq import pack_gemm  # noqa: E402
from test_gptq import autogptq_pack  # noqa: E402
from test_gptq import reference_weight as gptq_reference  # noqa: E402

E, TOPK, HIDDEN, INTER, VOCAB = 4, 2, 64, 32, 64


@pytest.fixture(autouse=True)
def exact_numerics():
    """These tests hold quantload to the tools' own numerics: dequantize-then-matmul (quantload.set_exact),
    not the packed kernels loads use by default (bfloat16 products, runtime/kernels.py)."""
    previous = quantload.set_exact(True)
    yield
    quantload.set_exact(previous)
IDS = torch.tensor([[1, 5, 9, 17, 3, 30, 44, 2, 11, 60]])


def tiny_config(family):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, intermediate_size=96, moe_intermediate_size=INTER,
                                           shared_expert_intermediate_size=48, num_experts=E,
                                           num_experts_per_tok=TOPK)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=96, moe_intermediate_size=INTER,
                                           num_experts=E, num_experts_per_tok=TOPK, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=INTER, num_local_experts=E,
                                          num_experts_per_tok=TOPK)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**common, head_dim=16, intermediate_size=INTER, num_local_experts=E,
                                         num_experts_per_tok=TOPK, sliding_window=8)
    if family == "minimax_m2":
        return transformers.MiniMaxM2Config(**common, head_dim=16, intermediate_size=INTER, num_local_experts=E,
                                            num_experts_per_tok=TOPK, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


FAMILIES = ["qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss", "minimax_m2"]
MIXTRAL_STYLE = ("mixtral", "minimax_m2")     # block_sparse_moe.experts.N.w1/w3/w2 on the hub


def tiny_model(family, seed=0):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():   # random init leaves some weights tiny; give every expert a visible share
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):   # MiniMax-M2's routing bias: must be loaded, not left 0
                b.normal_(0, 0.5)
    return model


# --- the fused <-> per-expert layouts, written out independently of quantload -------------------------
def experts_prefixes(model):
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]


def split_experts(family, sd, prefix):
    """transformers' fused parameters -> {f"{prefix}.{e}.{role}.{kind}": tensor} (llm-compressor naming)."""
    out = {}
    gu, down = sd.pop(f"{prefix}.gate_up_proj"), sd.pop(f"{prefix}.down_proj")
    if family == "gpt_oss":     # [E, H, 2I] interleaved gate/up, x @ W; biases [E, 2I], [E, H]
        gub, downb = sd.pop(f"{prefix}.gate_up_proj_bias"), sd.pop(f"{prefix}.down_proj_bias")
        for e in range(E):
            out[f"{prefix}.{e}.gate_proj.weight"] = gu[e][:, 0::2].t().contiguous()
            out[f"{prefix}.{e}.up_proj.weight"] = gu[e][:, 1::2].t().contiguous()
            out[f"{prefix}.{e}.down_proj.weight"] = down[e].t().contiguous()
            out[f"{prefix}.{e}.gate_proj.bias"] = gub[e][0::2].contiguous()
            out[f"{prefix}.{e}.up_proj.bias"] = gub[e][1::2].contiguous()
            out[f"{prefix}.{e}.down_proj.bias"] = downb[e].contiguous()
    else:                       # [E, 2I, H], gate rows then up rows
        for e in range(E):
            out[f"{prefix}.{e}.gate_proj.weight"] = gu[e][:INTER].contiguous()
            out[f"{prefix}.{e}.up_proj.weight"] = gu[e][INTER:].contiguous()
            out[f"{prefix}.{e}.down_proj.weight"] = down[e].contiguous()
    return out


def fuse_experts(family, sd, prefix):
    """The inverse of split_experts."""
    g = [sd.pop(f"{prefix}.{e}.gate_proj.weight") for e in range(E)]
    u = [sd.pop(f"{prefix}.{e}.up_proj.weight") for e in range(E)]
    d = [sd.pop(f"{prefix}.{e}.down_proj.weight") for e in range(E)]
    if family == "gpt_oss":
        gu = torch.empty(E, 2 * INTER, HIDDEN)
        gu[:, 0::2], gu[:, 1::2] = torch.stack(g), torch.stack(u)
        sd[f"{prefix}.gate_up_proj"] = gu.transpose(1, 2).contiguous()
        sd[f"{prefix}.down_proj"] = torch.stack(d).transpose(1, 2).contiguous()
        gb = torch.empty(E, 2 * INTER)
        gb[:, 0::2] = torch.stack([sd.pop(f"{prefix}.{e}.gate_proj.bias") for e in range(E)])
        gb[:, 1::2] = torch.stack([sd.pop(f"{prefix}.{e}.up_proj.bias") for e in range(E)])
        sd[f"{prefix}.gate_up_proj_bias"] = gb
        sd[f"{prefix}.down_proj_bias"] = torch.stack([sd.pop(f"{prefix}.{e}.down_proj.bias") for e in range(E)])
    else:
        sd[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(g), torch.stack(u)], 1)
        sd[f"{prefix}.down_proj"] = torch.stack(d)


MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def per_expert_state_dict(family, model):
    """The model's weights with experts per expert, under the names the hub's checkpoints use."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for prefix in experts_prefixes(model):
        sd.update(split_experts(family, sd, prefix))
    if family in MIXTRAL_STYLE:
        renamed = {}
        for k, v in sd.items():
            k = k.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            k = k.replace(".mlp.e_score_correction_bias", ".block_sparse_moe.e_score_correction_bias")
            for role, w in MIXTRAL_NAMES.items():
                k = k.replace(f".{role}.", f".{w}.") if ".mlp.experts." in k else k
            renamed[k.replace(".mlp.experts.", ".block_sparse_moe.experts.")] = v
        sd = renamed
    return sd


def model_names(family, sd):
    """Hub names -> the model's per-expert names (Mixtral back from block_sparse_moe)."""
    if family not in MIXTRAL_STYLE:
        return dict(sd)
    out = {}
    for k, v in sd.items():
        k = k.replace(".block_sparse_moe.gate.", ".mlp.gate.").replace(".block_sparse_moe.experts.", ".mlp.experts.")
        k = k.replace(".block_sparse_moe.e_score_correction_bias", ".mlp.e_score_correction_bias")
        for role, w in MIXTRAL_NAMES.items():
            k = k.replace(f".{w}.", f".{role}.") if ".mlp.experts." in k else k
        out[k] = v
    return out


def reference_model(family, dense_sd):
    """transformers' own model (fused experts) holding `dense_sd` (hub names, per expert)."""
    ref = transformers.AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()
    sd = model_names(family, dense_sd)
    for prefix in experts_prefixes(ref):
        fuse_experts(family, sd, prefix)
    ref.load_state_dict(sd, strict=True)
    return ref


def write_checkpoint(path, family, sd, quantization_config=None):
    path.mkdir(parents=True, exist_ok=True)
    tiny_config(family).save_pretrained(path)
    if quantization_config is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def is_linear_weight(name, t, *, router=False):
    if t.dim() != 2 or not name.endswith(".weight") or "embed_tokens" in name or name.startswith("lm_head"):
        return False
    is_router = name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".mlp.router.weight"))
    return router or not is_router


# --- the tools' quantizers, per Linear weight ---------------------------------------------------------
def bnb_dequantize(packed, state):
    """bitsandbytes' own pure-torch NF4 dequantization (backends/default). Its CPU kernel
    (bitsandbytes 0.50.2, `dequantize_4bit` on CPU) decodes each row on its own and is wrong when a row
    is not a whole number of 64-value blocks (down_proj [64, 32] here), so it is not the reference."""
    import bitsandbytes.functional as bf
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    absmax = state.absmax
    if state.nested:
        absmax = bf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    return compute(packed.reshape(-1), absmax.float(), _get_4bit_code(state.quant_type, packed.device),
                   state.blocksize, state.shape, torch.float32)


def bnb_nf4(w):
    """transformers 4 + bitsandbytes: Params4bit's packed weight and QuantState.as_dict(packed=True)."""
    import bitsandbytes.functional as bf
    packed, state = bf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    pieces = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    return pieces, bnb_dequantize(packed, state)


BNB_CONFIG = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}


def rtn_codes(w, gs=32):
    """Round-to-nearest 4-bit asymmetric codes per group: q [I, O], z [ng, O] in 1..15, scales fp16 [ng, O]."""
    o, i = w.shape
    g = w.reshape(o, i // gs, gs)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-4).to(torch.float16)
    z = torch.round(-lo / scale.float()).clamp(1, 15)
    q = (torch.round(g / scale.float()[..., None]) + z[..., None]).clamp(0, 15).reshape(o, i)
    return q.long().t().contiguous(), z.long().t().contiguous(), scale.t().contiguous()


def gptq(w, gs=32):
    q, z, s = rtn_codes(w, gs)
    g_idx = torch.arange(w.shape[1], dtype=torch.int32) // gs
    return autogptq_pack(q, z, s, g_idx, 4, v1=True), gptq_reference(q, z, s, g_idx)


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
               "checkpoint_format": "gptq"}


def awq(w, gs=32):
    q, z, s = rtn_codes(w, gs)
    i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a.astype(np.uint32)).view(np.int32))  # noqa: E731
    pieces = {"qweight": i32(pack_gemm(q.numpy())), "qzeros": i32(pack_gemm(z.numpy())), "scales": s}
    return pieces, awq_reference(q, z, s, gs)


AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}

CT_ARGS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
CT_CONFIG = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": {"targets": ["Linear"], "weights": CT_ARGS}},
             "ignore": ["lm_head", "re:.*mlp.gate$", "re:.*router$"]}


def compressed_tensors(w):
    from test_compressed import _ct_reference
    out, dense = _ct_reference(w, CT_ARGS)
    return {f"weight_{k.removeprefix('weight_')}" if k != "weight" else k: v for k, v in out.items()}, dense


SCHEMES = {
    # name: (quantize one weight -> (pieces by suffix, tool's dequantized weight), config, routers too)
    "bnb-nf4": (bnb_nf4, BNB_CONFIG, True),
    "gptq": (gptq, GPTQ_CONFIG, False),
    "awq": (awq, AWQ_CONFIG, False),
    "compressed-tensors": (compressed_tensors, CT_CONFIG, False),
}


def quantized_checkpoint(path, family, model, scheme):
    """The per-expert checkpoint the tool writes, and the dense weights the tool reads back from it."""
    quant, qc, routers = SCHEMES[scheme]
    sd = per_expert_state_dict(family, model)
    out, dense = {}, {}
    for k, v in sd.items():
        # groups of 32 need whole groups (shared_expert.down_proj: 48 inputs); AWQ packs 8 outputs a word,
        # AutoGPTQ's packer 32 outputs per zero-point row (shared_expert gate/up: 48 outputs stay dense)
        outs = 32 if scheme == "gptq" else 8
        fits = scheme == "bnb-nf4" or (v.dim() == 2 and v.shape[0] % outs == 0 and v.shape[1] % 32 == 0)
        if is_linear_weight(k, v, router=routers) and fits:
            pieces, deq = quant(v)
            prefix = k.removesuffix(".weight")
            out.update({f"{prefix}.{s}": t for s, t in pieces.items()})
            dense[k] = deq.float()
        else:
            out[k] = v
            dense[k] = v
    write_checkpoint(path, family, out, qc)
    return dense


def greedy(model, n=6):
    with torch.inference_mode():
        return model.generate(IDS[:, :4], max_new_tokens=n, do_sample=False, pad_token_id=0)[0, 4:].tolist()


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids).logits


def qexperts(model):
    return [m for m in model.modules() if isinstance(m, QExperts)]


# --- dense checkpoints: transformers' own save_pretrained layouts ------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_checkpoint_loads_into_transformers_moe(tmp_path, family):
    """save_pretrained writes Qwen-MoE per expert, Mixtral and MiniMax-M2 as block_sparse_moe.experts.N.w1/w3/w2,
    gpt-oss fused: all load with the same logits as the original model."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    ours = quantload.load(tmp_path / "m", dtype=torch.float32, progress=False)
    assert ours.load_report.unexpected_keys == []
    if family == "minimax_m2":   # the routing bias is a buffer, under block_sparse_moe in the file
        assert torch.equal(ours.model.layers[1].mlp.e_score_correction_bias,
                           model.model.layers[1].mlp.e_score_correction_bias)
    # (transformers' own grouped_mm and the per-expert loop sum in other orders: float noise)
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_per_expert_dense_checkpoint_equals_the_fused_model(tmp_path, family):
    """The per-expert split of transformers' fused layout (gpt-oss: interleaved gate/up, transposed,
    biases) read back into QExperts gives the original model's logits."""
    model = tiny_model(family)
    write_checkpoint(tmp_path / "m", family, per_expert_state_dict(family, model))
    ours = quantload.load(tmp_path / "m", dtype=torch.float32, progress=False)
    assert len(qexperts(ours)) == 2 and ours.load_report.unexpected_keys == []
    torch.testing.assert_close(logits(ours), logits(model), rtol=1e-6, atol=1e-6)


# --- per-expert quantized checkpoints, as the tools write them ----------------------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_per_expert_checkpoint(tmp_path, family, scheme):
    model = tiny_model(family)
    dense = quantized_checkpoint(tmp_path / "q", family, model, scheme)
    ours = quantload.load(tmp_path / "q", dtype=torch.float32, progress=False)
    assert ours.load_report.unexpected_keys == [] and ours.load_report.companion_keys > 0
    names = model_names(family, dense)
    for layer, experts in enumerate(qexperts(ours)):
        for e, mlp in enumerate(experts):
            for role in ("gate_proj", "up_proj", "down_proj"):
                lin = getattr(mlp, role)
                assert isinstance(lin, QLinear), (layer, e, role)   # one QTensor per expert per projection
                want = names[f"model.layers.{layer}.mlp.experts.{e}.{role}.weight"]
                assert torch.equal(lin.qweight.dequantize(torch.float32), want), (layer, e, role)
    ref = reference_model(family, dense)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-5)
    assert greedy(ours) == greedy(ref)


# --- quantize while loading a float MoE checkpoint ------------------------------------------------------
@pytest.mark.parametrize("layout", ["fused", "per-expert"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_quantize_nf4_while_loading_keeps_experts_quantized(tmp_path, family, layout):
    """quantize="nf4" of a bf16/fp32 checkpoint: every expert projection is quantized from its own slice
    (fused checkpoints are sliced per expert, never dequantized whole), to bitsandbytes' bytes."""
    model = tiny_model(family)
    sd = per_expert_state_dict(family, model)
    import bitsandbytes.functional as bf
    ckpt = dict(model.state_dict()) if layout == "fused" else sd
    write_checkpoint(tmp_path / "f", family, ckpt)
    ours = quantload.load(tmp_path / "f", quantize="nf4", dtype=torch.float32, progress=False)
    assert ours.load_report.unexpected_keys == []
    expert_linears = [getattr(m, r) for x in qexperts(ours) for m in x for r in ("gate_proj", "up_proj", "down_proj")]
    assert len(expert_linears) == 2 * E * 3 and all(isinstance(q, QLinear) for q in expert_linears)
    dense = dict(sd)
    for name, mod in ours.named_modules():
        if not isinstance(mod, QLinear):
            continue
        # the 4-bit codes are bitsandbytes' own for this expert's slice; the bytes decode (by bitsandbytes'
        # code) to what the module computes with. (bitsandbytes' CPU kernel rounds a few double-quantized
        # absmax codes one step away from its pure-torch backend, which quantload follows.)
        enc = mod.qweight.encode()
        packed, _ = bf.quantize_4bit(sd[name + ".weight"], quant_type="nf4", blocksize=64, compress_statistics=True)
        assert torch.equal(enc["weight"], packed), name
        state = bf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in enc.items() if k != "weight"},
                                        device=torch.device("cpu"))
        dense[name + ".weight"] = bnb_dequantize(enc["weight"], state)
        assert torch.equal(mod.qweight.dequantize(torch.float32), dense[name + ".weight"]), name
    ref = reference_model(family, dense)
    torch.testing.assert_close(logits(ours), logits(ref), rtol=1e-5, atol=1e-5)
    assert greedy(ours) == greedy(ref)


def test_quantize_int4_while_loading_keeps_experts_quantized(tmp_path):
    from quantload.schemes.affine import IntQuantConfig
    model = tiny_model("mixtral")
    write_checkpoint(tmp_path / "f", "mixtral", dict(model.state_dict()))
    ours = quantload.load(tmp_path / "f", quantize=IntQuantConfig(bits=4, group_size=32), dtype=torch.float32,
                          progress=False)
    experts = qexperts(ours)
    assert all(isinstance(getattr(m, r), QLinear) for x in experts for m in x for r in ("gate_proj", "down_proj"))
    dense = {}
    for name, mod in ours.named_modules():
        if isinstance(mod, QLinear):
            dense[name + ".weight"] = mod.qweight.dequantize(torch.float32)
    # the int4 codes are compressed-tensors' own: compressing the original expert weight gives the same
    from test_compressed import _ct_reference
    w = model.model.layers[1].mlp.experts.gate_up_proj[3, INTER:].detach()
    _, ct_dense = _ct_reference(w, dict(CT_ARGS, group_size=32))
    assert torch.equal(experts[1][3].up_proj.qweight.dequantize(torch.float32), ct_dense)
    assert len(dense) == 2 * (4 + 3 * E)


# --- only the picked experts run -----------------------------------------------------------------------
def test_only_the_picked_experts_are_computed_and_dequantized(tmp_path, monkeypatch):
    from quantload.schemes.bnb4 import Bnb4Scheme
    model = tiny_model("qwen2_moe")
    quantized_checkpoint(tmp_path / "q", "qwen2_moe", model, "bnb-nf4")
    ours = quantload.load(tmp_path / "q", dtype=torch.float32, progress=False)
    picked = {}
    for i, layer in enumerate(ours.model.layers):
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: picked.__setitem__(i, out[2].clone()))
    owner = {id(getattr(m, r).qweight.data): (i, e) for i, x in enumerate(qexperts(ours)) for e, m in enumerate(x)
             for r in ("gate_proj", "up_proj", "down_proj")}
    dequantized = []
    original = Bnb4Scheme.dequantize

    def counting(self, qt, dtype):
        if id(qt.data) in owner:
            dequantized.append(owner[id(qt.data)])
        return original(self, qt, dtype)

    monkeypatch.setattr(Bnb4Scheme, "dequantize", counting)
    for x in qexperts(ours):
        x.calls = [0] * E
    logits(ours, IDS[:, :1])    # one token: top-2 of 4 experts per layer
    for i, x in enumerate(qexperts(ours)):
        chosen = set(picked[i].reshape(-1).tolist())
        assert len(chosen) == TOPK
        assert [x.calls[e] for e in range(E)] == [1 if e in chosen else 0 for e in range(E)]
        assert {e for (layer, e) in dequantized if layer == i} == chosen
    assert len(dequantized) == 2 * TOPK * 3     # 2 layers x 2 experts x 3 projections, nothing else


def test_prequantized_router_is_dequantized_once_at_load(tmp_path):
    """transformers 4 + bitsandbytes quantized the router Linear (mlp.gate); transformers 5 makes it a
    plain parameter: it is decoded and dequantized at load, to bitsandbytes' own values."""
    model = tiny_model("mixtral")
    dense = quantized_checkpoint(tmp_path / "q", "mixtral", model, "bnb-nf4")
    ours = quantload.load(tmp_path / "q", dtype=torch.float32, progress=False)
    router = ours.model.layers[0].mlp.gate.weight
    assert type(router) is torch.nn.Parameter
    assert torch.equal(router, dense["model.layers.0.block_sparse_moe.gate.weight"])


# --- gpt-oss MXFP4: stacked quantized experts, one packed QTensor per expert ---------------------------
def mxfp4_pack(w):
    """compressed-tensors' own MXFP4 packer: [out, in] -> blocks [out, in/32, 16], E8M0 scales [out, in/32]
    (the byte layout of gpt-oss's `*_blocks` / `*_scales`)."""
    from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    g = w.unflatten(-1, (-1, 32))
    scale, _ = calculate_qparams(g.amin(-1).float(), g.amax(-1).float(), scheme.weights)
    out = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return out["weight_packed"].reshape(w.shape[0], -1, 16), out["weight_scale"]


def test_gpt_oss_mxfp4_experts_stay_packed_and_equal_transformers(tmp_path):
    pytest.importorskip("quantload.schemes.mxfp4", reason="the MXFP4 scheme (formats branch) is not here")
    pytest.importorskip("compressed_tensors.compressors.mxfp4")
    model = tiny_model("gpt_oss").to(torch.bfloat16)
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed = [mxfp4_pack(v[e].t().contiguous()) for e in range(E)]    # per expert [out, in]
            tensors[k + "_blocks"] = torch.stack([p[0] for p in packed])
            tensors[k + "_scales"] = torch.stack([p[1] for p in packed])
        else:
            tensors[k] = v
    write_checkpoint(tmp_path / "m", "gpt_oss", tensors, {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]})
    # transformers dequantizes MXFP4 when it loads on a CPU
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ours = quantload.load(tmp_path / "m", dtype=torch.float32, progress=False)
    assert ours.load_report.unexpected_keys == [] and ours.load_report.missing_keys == []
    for layer, experts in enumerate(qexperts(ours)):
        gu = theirs.model.layers[layer].mlp.experts.gate_up_proj      # [E, H, 2I], gate/up interleaved
        down = theirs.model.layers[layer].mlp.experts.down_proj       # [E, I, H]
        for e, mlp in enumerate(experts):
            assert all(getattr(mlp, r).scheme.name == "mxfp4" for r in ("gate_proj", "up_proj", "down_proj"))
            assert torch.equal(mlp.gate_proj.qweight.dequantize(torch.float32), gu[e][:, 0::2].t())
            assert torch.equal(mlp.up_proj.qweight.dequantize(torch.float32), gu[e][:, 1::2].t())
            assert torch.equal(mlp.down_proj.qweight.dequantize(torch.float32), down[e].t())
            assert mlp.down_proj.qweight.nbytes == HIDDEN * INTER // 2 + HIDDEN * INTER // 32
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert greedy(ours) == greedy(theirs)


def test_saved_quantized_experts_load_back(tmp_path):
    """save() writes each expert's packed pieces under its per-expert key (the layout read above)."""
    model = tiny_model("qwen3_moe")
    write_checkpoint(tmp_path / "f", "qwen3_moe", dict(model.state_dict()))
    ours = quantload.load(tmp_path / "f", quantize="nf4", dtype=torch.float32, progress=False)
    quantload.save(ours, tmp_path / "saved")
    keys = load_file(str(tmp_path / "saved" / "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.3.down_proj.weight.absmax" in keys
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    again = quantload.load(tmp_path / "saved", dtype=torch.float32, progress=False)
    assert again.load_report.quantized_modules == ours.load_report.quantized_modules
    assert torch.equal(logits(again), logits(ours))


def test_plan_counts_the_experts_quantized(tmp_path):
    """plan() prepares the skeleton as load() does: the experts are planned at their quantized size."""
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "m")
    plan = quantload.plan(tmp_path / "m", quantize="nf4", device_map="auto", max_memory={"cpu": "1GiB"})
    ours = quantload.load(tmp_path / "m", quantize="nf4", dtype=torch.float32, progress=False)
    dense = sum(p.numel() * 4 for p in model.parameters())
    assert plan.total_bytes < 0.6 * dense
    assert abs(plan.total_bytes - ours.load_report.model_bytes) <= 0.05 * ours.load_report.model_bytes


def test_unsupported_experts_class_is_named(tmp_path):
    """An MoE whose experts QExperts does not reproduce (OLMoE here) refuses per-expert checkpoints by
    name, listing the supported ones, instead of reporting its fused parameters missing."""
    cfg = transformers.OlmoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_experts=E, num_experts_per_tok=TOPK)
    transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path / "m")   # per expert, as the hub has it
    with pytest.raises(quantload.UnsupportedError, match="OlmoeExperts .* supported experts: Qwen2MoeExperts"):
        quantload.load(tmp_path / "m", progress=False)
