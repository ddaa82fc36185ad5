"""Perplexity of SmolLM2-135M-Instruct on a few thousand tokens of English text, for several ways of
loading it with quantload (bf16 reference, int4 group 128, NF4, GGUF Q4_1).

    .venv/bin/python -m bench.perplexity [--text FILE] [--tokens 4096]

The default text is the GPL-3 licence shipped by Debian (/usr/share/common-licenses/GPL-3): plain English,
present on every machine of this project, never used to train the quantizers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    """Non-overlapping windows; mean token NLL over everything after each window's first token."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            nll += loss.item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None) -> int:
    import quantload
    import realmodels
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    bf16 = realmodels.smollm2_bf16()
    tok = quantload.load_tokenizer(bf16)
    ids = tok(open(a.text).read(), return_tensors="pt").input_ids[:, : a.tokens]
    rows = []
    for label, path, kw in [
        ("bf16 (reference)", bf16, dict(dtype="bfloat16")),
        ("float32", bf16, dict(dtype="float32")),
        ("int4 group 128 (compressed-tensors, on the fly)", bf16, dict(quantize="int4", dtype="float32")),
        ("nf4 double quant (on the fly)", bf16, dict(quantize="nf4", dtype="float32")),
        ("GGUF Q4_1 (the packaged file)", realmodels.smollm2_gguf(), dict(dtype="float32")),
    ]:
        t = time.perf_counter()
        model = quantload.load(path, progress=False, **kw)
        ppl = perplexity(model, ids)
        rows.append({"model": label, "perplexity": round(ppl, 3), "weights_MiB": round(model.load_report.model_bytes / 2**20, 1),
                     "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del model
    print(f"\n{ids.shape[1]} tokens of {a.text}")
    print("| model | perplexity | weights (MiB) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['perplexity']} | {r['weights_MiB']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
