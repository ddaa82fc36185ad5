"""Greedy decode of a small random mixture-of-experts model: quantload with the experts kept quantized
(runtime/experts.py: only the picked experts run) against transformers' own model holding the same
weights dequantized (its fused experts, float32):

    python -m bench.moe_decode [--family qwen3_moe] [--quantize nf4] [--fast] [--tokens 32] [--repeats 3] [--threads 1]

The model is built from a config (no hub): --layers 4, --hidden 512, --experts 16 of --expert-size 256,
top --topk 2, vocabulary 2048, written as a per-expert bfloat16 checkpoint (the layout the hub's
MoE releases use), then loaded by quantload with quantize= (each expert quantized from its own weight).
The reference is transformers' class with quantload's dequantized weights fused back into its
`experts.gate_up_proj` / `down_proj`, so both decode the same tokens (checked). Tokens/s is the median of
--repeats greedy decodes of --tokens tokens after one warm-up, the two models alternating; memory is the
bytes of the expert weights each holds. On a shared machine absolute figures move with the load: compare
within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time


def build_config(family: str, layers: int, hidden: int, experts: int, expert_size: int, topk: int):
    import transformers
    common = dict(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=hidden // 8, intermediate_size=4 * hidden,
                                           moe_intermediate_size=expert_size, num_experts=experts,
                                           num_experts_per_tok=topk, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=expert_size, num_local_experts=experts,
                                          num_experts_per_tok=topk)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**common, head_dim=hidden // 8, intermediate_size=expert_size,
                                         num_local_experts=experts, num_experts_per_tok=topk, sliding_window=128)
    raise SystemExit(f"--family {family!r}: expected qwen3_moe, mixtral or gpt_oss")


def write_checkpoint(config, directory):
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)    # transformers writes the experts per expert (hub layout)
    return model


def dequantized_reference(ours, config):
    """transformers' model with quantload's weights, dequantized, fused back into its 3-D experts."""
    import torch
    import transformers
    from quantload.moe_load import find_experts
    from quantload.runtime.experts import QExperts
    from quantload.runtime.modules import _QModule
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    sd = {}
    for name, mod in ours.named_modules():
        if isinstance(mod, _QModule):
            sd[name + ".weight"] = mod.qweight.dequantize(torch.float32)
    for name, p in ours.named_parameters():
        sd.setdefault(name, p.detach().float())
    for prefix, mod, layout in find_experts(ref):
        q = ours.get_submodule(prefix)
        assert isinstance(q, QExperts)
        def pop(role, kind="weight"):
            return [sd.pop(f"{prefix}.{e}.{role}.{kind}") for e in range(layout.num_experts)]
        gate, up, down = torch.stack(pop("gate_proj")), torch.stack(pop("up_proj")), torch.stack(pop("down_proj"))
        if layout.interleaved:
            gu = torch.empty(layout.num_experts, 2 * layout.intermediate, layout.hidden)
            gu[:, 0::2], gu[:, 1::2] = gate, up
        else:
            gu = torch.cat([gate, up], 1)
        sd[f"{prefix}.gate_up_proj"] = gu.transpose(1, 2).contiguous() if layout.transposed else gu
        sd[f"{prefix}.down_proj"] = down.transpose(1, 2).contiguous() if layout.transposed else down
        if layout.bias:
            gb, ub, db = (torch.stack(pop(r, "bias")) for r in ("gate_proj", "up_proj", "down_proj"))
            gub = torch.empty(layout.num_experts, 2 * layout.intermediate)
            gub[:, 0::2], gub[:, 1::2] = gb, ub
            sd[f"{prefix}.gate_up_proj_bias"], sd[f"{prefix}.down_proj_bias"] = gub, db
    ref.load_state_dict(sd, strict=True)
    return ref


def expert_bytes(model) -> int:
    from quantload.runtime.experts import QExperts
    from quantload.runtime.modules import _QModule
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QExperts):
            for sub in mod.modules():
                if isinstance(sub, _QModule):
                    total += sub.qweight.nbytes
                else:
                    total += sum(p.numel() * p.element_size() for p in sub.parameters(recurse=False))
        elif type(mod).__name__.endswith("Experts"):
            total += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    return total


def decode(model, ids, n: int) -> tuple[float, list[int]]:
    import torch
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return n / dt, out[0, ids.shape[1]:].tolist()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--quantize", default="nf4")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--fast", action="store_true",
                   help="quantload's packed CPU kernels (runtime/kernels.py, the load default); without it the "
                        "exact path (dequantize, then matmul), whose tokens must equal the reference's")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    a = p.parse_args(argv)

    import torch
    import quantload
    torch.set_num_threads(a.threads)
    from quantload.runtime import kernels
    kernels.set_fast_kernels(a.fast)   # before the load: eligible weights are marked there
    config = build_config(a.family, a.layers, a.hidden, a.experts, a.expert_size, a.topk)
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(config, d)
        t0 = time.perf_counter()
        ours = quantload.load(d, quantize=a.quantize, dtype=torch.float32, progress=False)
        load_s = time.perf_counter() - t0
    ref = dequantized_reference(ours, config)
    ids = torch.tensor([[1, 17, 99, 512, 7, 1024, 3, 42]])
    rates = {"quantload": [], "transformers-dequantized": []}
    tokens = {}
    models = {"quantload": ours, "transformers-dequantized": ref}
    for name, m in models.items():
        decode(m, ids, 4)      # warm-up
    for _ in range(a.repeats):
        for name, m in models.items():
            rate, toks = decode(m, ids, a.tokens)
            rates[name].append(rate)
            tokens[name] = toks
    result = {
        "family": a.family, "quantize": a.quantize, "fast_kernels": a.fast, "threads": a.threads, "tokens": a.tokens,
        "experts": a.experts, "topk": a.topk, "layers": a.layers, "hidden": a.hidden,
        "quantized_modules": ours.load_report.quantized_modules,
        "load_s": round(load_s, 3),
        "tok_s": {k: round(statistics.median(v), 2) for k, v in rates.items()},
        "expert_bytes": {"quantload": expert_bytes(ours), "transformers-dequantized": expert_bytes(ref)},
        "same_tokens": tokens["quantload"] == tokens["transformers-dequantized"],
    }
    result["speed_ratio"] = round(result["tok_s"]["quantload"] / result["tok_s"]["transformers-dequantized"], 3)
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>18}: {v}")
    return result


if __name__ == "__main__":
    main()
