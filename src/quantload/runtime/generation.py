"""Greedy decoding with less per-token work than transformers' `generate`, and the thread default.

`greedy(model, ids, n)` runs a prefill of the prompt (logits of its last position only), then one
forward per new token on a DynamicCache, taking the argmax: no logits processors, stopping criteria
objects, attention-mask bookkeeping or output dataclasses per step. It gives the tokens `model.generate(
ids, do_sample=False)` gives for one sequence (tests/test_generation.py checks it), and stops after an
end-of-sequence token as generate does. `quantload generate` uses it; `--hf-generate` takes
transformers' generate instead, and `model.generate` itself is transformers' own, unchanged.

What was measured (SmolLM2-135M Q4_1 GGUF on the packed kernels, 32 new tokens, 1 thread, process CPU
time per token on a busy 2-core AMD EPYC, medians of 5 interleaved runs): transformers' generate
27.3 ms, this loop 25.1 ms (-8%), this loop on a StaticCache 26.3 ms (a static cache does not pay without
compilation). torch.compile of the decode step over a StaticCache ran at 19.3 ms a token (same tokens),
but took 115 s to compile and still 50 s to start in a second process with inductor's on-disk cache warm
(TorchDynamo re-traces the model in every process; the GGUF embedding and the packed kernels' Python
also break the graph): a loss for any generation under a few thousand tokens, so it is not used.
"""
from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

import torch


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once), from the Linux
    topology files; os.cpu_count() where they cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                package = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return len(cpus) or 1
        cores.add((package, core))
    return len(cores) or 1


def set_threads(threads: int | None = None) -> int:
    """torch's intra-op threads: `threads`, or all physical cores when None (a second thread on one core
    shares its vector units and slows the matmul kernels down). Returns the number set."""
    n = physical_cores() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n


@dataclass
class Generation:
    tokens: list[int]                  # the new tokens (the end-of-sequence token included when one ended it)
    prompt_tokens: int
    prefill_s: float                   # the prompt's forward, which gives the first new token
    decode_s: float                    # the forwards of the tokens after the first
    stopped: bool = False              # ended by an end-of-sequence token
    per_token_s: list[float] = field(default_factory=list, repr=False)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens per second of decoding (the tokens after the first, over their forwards)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


def _eos_ids(model, eos_token_id) -> set[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV cache argument `cache` (4.x: `past_key_values`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefill_kwargs(model) -> dict:
    """Logits of the prompt's last position only, where the model's forward takes logits_to_keep."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _new_cache(model):
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)   # sliding-window layers (gemma-3) get their own layer type
    except TypeError:                              # older transformers
        return DynamicCache()


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id=None,
           stop_at_eos: bool = True) -> Generation:
    """Greedy decode of up to max_new_tokens for one sequence (input_ids of shape [1, T] or [T])."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if ids.shape[0] != 1:
        raise ValueError(f"greedy decodes one sequence; got a batch of {ids.shape[0]} (use model.generate)")
    if max_new_tokens < 1:
        return Generation([], ids.shape[1], 0.0, 0.0)
    ids = ids.to(_device(model))
    eos = _eos_ids(model, eos_token_id) if stop_at_eos else set()
    key = _cache_kwarg(model)
    cache = _new_cache(model)
    tokens, per_token = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(ids, use_cache=True, **_prefill_kwargs(model), **{key: cache}).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        prefill_s = time.perf_counter() - t0
        t_start = time.perf_counter()
        while len(tokens) < max_new_tokens and tokens[-1] not in eos:
            t = time.perf_counter()
            nxt = model(nxt, use_cache=True, **{key: cache}).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            per_token.append(time.perf_counter() - t)
        decode_s = time.perf_counter() - t_start
    return Generation(tokens, ids.shape[1], prefill_s, decode_s, stopped=tokens[-1] in eos, per_token_s=per_token)
