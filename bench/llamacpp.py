"""GGUF decode and prefill, quantload against llama.cpp (llama-cpp-python), one fresh worker per side.

Both sides run the same GGUF file on the same number of threads (inputs.bench_threads(): --threads, else
the physical cores), and are timed the same way:
- decode: greedy, DECODE_TOKENS new tokens after the prompt inputs.PROMPT, end-of-sequence ignored;
  tokens/s counts the tokens after the first over the time after the first (the first comes out of the
  prompt's forward). A warm-up decode of WARMUP_TOKENS first (quantload repacks its weights on the first forward,
  llama.cpp maps and pages in its file), then the median of IN_PROCESS runs.
- prefill: the first inputs.PREFILL_TOKENS tokens of inputs.prefill_text() in one forward into an empty
  KV cache, logits of the last position only (llama.cpp's default); tokens/s, median of IN_PROCESS
  after a warm-up.
quantload runs its default generation path (runtime/generation.greedy) with the packed kernels on.
The harness takes the median over fresh processes.
"""
from __future__ import annotations

import statistics
import time

from . import inputs

DECODE_TOKENS = 32
WARMUP_TOKENS = 4
IN_PROCESS = 3


def _median_of(fn, warmup=None, n: int = IN_PROCESS):
    (warmup or fn)()                       # warm-up: first-call costs stay out of the figure
    return statistics.median(fn() for _ in range(n))


# --- quantload --------------------------------------------------------------------------------------------
def _ql_model(path):
    import torch
    import quantload
    from quantload.runtime import kernels
    threads = inputs.bench_threads()
    torch.set_num_threads(threads)
    kernels.set_fast_kernels(True)
    t0 = time.perf_counter()
    model = quantload.load(path, progress=False)
    return model, quantload.load_tokenizer(path), threads, time.perf_counter() - t0


def ql_decode(path) -> dict:
    from quantload.runtime import generation
    model, tok, threads, load_s = _ql_model(path)
    ids = tok(inputs.PROMPT, return_tensors="pt")["input_ids"]
    runs = []

    def once(n=DECODE_TOKENS):
        g = generation.greedy(model, ids, n, stop_at_eos=False)
        runs.append(g)
        return g.decode_tokens_per_s
    rate = _median_of(once, lambda: once(WARMUP_TOKENS))
    return {"tokens_per_s": rate, "tokens": runs[-1].tokens, "threads": threads, "load_s": load_s,
            "prompt_tokens": ids.shape[1], "api": "generation.greedy, packed kernels"}


def ql_prefill(path) -> dict:
    import torch
    from quantload.runtime import generation
    model, tok, threads, load_s = _ql_model(path)
    ids = tok(inputs.prefill_text(), return_tensors="pt")["input_ids"][:, :inputs.PREFILL_TOKENS]
    key = generation._cache_kwarg(model)

    def once():
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1, **{key: generation._new_cache(model)})
            return ids.shape[1] / (time.perf_counter() - t0)
    return {"tokens_prefill_per_s": _median_of(once), "threads": threads, "load_s": load_s,
            "prefill_tokens": ids.shape[1]}


def ql_decode_smollm2() -> dict:
    return ql_decode(inputs.smollm2_gguf())


def ql_prefill_smollm2() -> dict:
    return ql_prefill(inputs.smollm2_gguf())


def ql_decode_gemma() -> dict:
    return ql_decode(inputs.find_gemma_gguf())


def ql_prefill_gemma() -> dict:
    return ql_prefill(inputs.find_gemma_gguf())


# --- llama.cpp --------------------------------------------------------------------------------------------
def _llama(path):
    from llama_cpp import Llama
    threads = inputs.bench_threads()
    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    return llm, threads, time.perf_counter() - t0


def llama_decode(path) -> dict:
    llm, threads, load_s = _llama(path)
    ids = llm.tokenize(inputs.PROMPT.encode(), add_bos=True, special=False)
    runs = []

    def once(n=DECODE_TOKENS):
        out, t_first = [], None
        for t in llm.generate(ids, temp=0.0, reset=True):   # temp 0: llama.cpp's greedy sampler
            out.append(int(t))
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) == n:
                break
        runs.append(out)
        return (len(out) - 1) / (time.perf_counter() - t_first)
    rate = _median_of(once, lambda: once(WARMUP_TOKENS))
    return {"tokens_per_s": rate, "tokens": runs[-1], "threads": threads, "load_s": load_s,
            "prompt_tokens": len(ids)}


def llama_prefill(path) -> dict:
    llm, threads, load_s = _llama(path)
    ids = llm.tokenize(inputs.prefill_text().encode(), add_bos=True, special=False)[:inputs.PREFILL_TOKENS]

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)
    return {"tokens_prefill_per_s": _median_of(once), "threads": threads, "load_s": load_s,
            "prefill_tokens": len(ids)}


def llama_decode_smollm2() -> dict:
    return llama_decode(inputs.smollm2_gguf())


def llama_prefill_smollm2() -> dict:
    return llama_prefill(inputs.smollm2_gguf())


def llama_decode_gemma() -> dict:
    return llama_decode(inputs.find_gemma_gguf())


def llama_prefill_gemma() -> dict:
    return llama_prefill(inputs.find_gemma_gguf())
