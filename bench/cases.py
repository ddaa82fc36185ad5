"""What the bench runs: runners (one measurement in one fresh process) and cases (a quantload runner
against an alternative runner, the metrics compared, and the issue's targets).

A runner shared by several cases (the transformers + bitsandbytes NF4 decode serves three decode
comparisons) runs once per repeat. This module imports only the stdlib: the
harness reads it without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

QUANTLOAD, ALTERNATIVE, MACHINE = "quantload", "alternative", "machine"


@dataclass(frozen=True)
class Runner:
    name: str
    fn: str                          # "module:function" inside the bench package
    side: str                        # QUANTLOAD, ALTERNATIVE or MACHINE
    label: str                       # what it is, for the table
    requires: tuple[str, ...] = ()   # importable modules it needs (optional dependencies of the bench)
    needs: tuple[str, ...] = ()      # cached inputs it reads (inputs.BUILDERS)
    slow: bool = False               # skipped by --quick
    needs_gemma: bool = False        # only when a gemma-3-270m GGUF is given


@dataclass(frozen=True)
class Metric:
    key: str            # key in the runner's output ("seconds", "Q4_K.elements_per_s", ...)
    label: str          # row label
    unit: str           # "s", "bytes", "per_s", "gb_per_s"
    better: str         # "lower" or "higher"
    target: float | None = None   # speedup (higher-is-better ratio) or fraction (bytes) to reach
    target_text: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    quantload: str                   # runner name
    alternative: str | None          # runner name (None: quantload's figure alone, e.g. memcpy)
    metrics: tuple[Metric, ...]
    parts: bool = False              # metrics are per part ("Q4_K", ...), expanded from the results
    check: str = ""                  # key of a bool in quantload's output: same result as the reference?
    check_label: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


_TF, _BNB, _GGUF, _LLAMA = "transformers", "bitsandbytes", "gguf", "llama_cpp"

RUNNERS = {r.name: r for r in [
    Runner("ql.gguf_smollm2", "loads:ql_gguf_smollm2", QUANTLOAD, "quantload.load(.gguf)", needs=("bf16",)),
    Runner("hf.gguf_smollm2", "loads:hf_gguf_smollm2", ALTERNATIVE, "transformers from_pretrained(gguf_file=)",
           requires=(_GGUF,), needs=("bf16",), slow=True),
    Runner("ql.gguf_gemma", "loads:ql_gguf_gemma", QUANTLOAD, "quantload.load(.gguf)", needs_gemma=True),
    Runner("hf.gguf_gemma", "loads:hf_gguf_gemma", ALTERNATIVE, "transformers from_pretrained(gguf_file=)",
           requires=(_GGUF,), slow=True, needs_gemma=True),
    Runner("ql.nf4_quantize_load", "loads:ql_nf4_quantize_load", QUANTLOAD, 'quantload.load(bf16, quantize="nf4")',
           needs=("bf16",)),
    Runner("hf.nf4_quantize_load", "loads:hf_nf4_quantize_load", ALTERNATIVE,
           "transformers + bitsandbytes BitsAndBytesConfig(nf4)", requires=(_BNB,), needs=("bf16",), slow=True),
    Runner("ql.nf4_prequantized", "loads:ql_nf4_prequantized", QUANTLOAD, "quantload.load(NF4 checkpoint)",
           needs=("bf16", "nf4")),
    Runner("hf.nf4_prequantized", "loads:hf_nf4_prequantized", ALTERNATIVE,
           "transformers + bitsandbytes from_pretrained(NF4 checkpoint)", requires=(_BNB,), needs=("bf16", "nf4")),
    Runner("ql.nf4_decode", "loads:ql_nf4_decode", QUANTLOAD, "quantload.load(NF4 checkpoint, dtype=float32)",
           needs=("bf16", "nf4")),
    Runner("hf.nf4_decode", "loads:hf_nf4_decode", ALTERNATIVE,
           "transformers + bitsandbytes from_pretrained(NF4 checkpoint, dtype=float32)", requires=(_BNB,),
           needs=("bf16", "nf4")),
    Runner("ql.gguf_decode", "loads:ql_gguf_decode", QUANTLOAD, "quantload.load(.gguf), packed kernels",
           needs=("bf16",)),
    Runner("ql.int4", "loads:ql_int4", QUANTLOAD, "quantload.load(bf16, quantize=int4 group 64)",
           needs=("bf16",)),
    Runner("ql.dense", "loads:ql_dense", QUANTLOAD, "quantload.load(bf16, dtype=float32)", needs=("bf16",)),
    Runner("hf.dense", "loads:hf_dense", ALTERNATIVE, "transformers from_pretrained(bf16, dtype=float32)",
           needs=("bf16",)),
    Runner("ql.decode_smollm2", "llamacpp:ql_decode_smollm2", QUANTLOAD,
           "quantload.load(.gguf), packed kernels, generation.greedy"),
    Runner("llama.decode_smollm2", "llamacpp:llama_decode_smollm2", ALTERNATIVE, "llama.cpp (llama-cpp-python)",
           requires=(_LLAMA,)),
    Runner("ql.prefill_smollm2", "llamacpp:ql_prefill_smollm2", QUANTLOAD, "quantload.load(.gguf), one forward"),
    Runner("llama.prefill_smollm2", "llamacpp:llama_prefill_smollm2", ALTERNATIVE, "llama.cpp eval",
           requires=(_LLAMA,)),
    Runner("ql.decode_gemma", "llamacpp:ql_decode_gemma", QUANTLOAD,
           "quantload.load(.gguf), packed kernels, generation.greedy", needs_gemma=True),
    Runner("llama.decode_gemma", "llamacpp:llama_decode_gemma", ALTERNATIVE, "llama.cpp (llama-cpp-python)",
           requires=(_LLAMA,), needs_gemma=True),
    Runner("ql.prefill_gemma", "llamacpp:ql_prefill_gemma", QUANTLOAD, "quantload.load(.gguf), one forward",
           needs_gemma=True),
    Runner("llama.prefill_gemma", "llamacpp:llama_prefill_gemma", ALTERNATIVE, "llama.cpp eval",
           requires=(_LLAMA,), needs_gemma=True),
    Runner("ql.gguf_q4_k_decode", "loads:ql_gguf_q4_k_decode", QUANTLOAD,
           "quantload.load(SmolLM2 Q4_K_M .gguf), packed kernels", requires=(_LLAMA,), needs=("bf16", "q4_k")),
    Runner("ql.awq", "loads:ql_awq", QUANTLOAD, "quantload.load(AWQ GEMM checkpoint, dtype=float32)",
           needs=("bf16", "awq")),
    Runner("ql.nf4_kernels", "kernels:ql_nf4_kernels", QUANTLOAD, "quantload NF4 scheme"),
    Runner("bnb.nf4_kernels", "kernels:bnb_nf4_kernels", ALTERNATIVE, "bitsandbytes quantize_4bit/dequantize_4bit",
           requires=(_BNB,)),
    Runner("ql.gguf_kernels", "kernels:ql_gguf_kernels", QUANTLOAD, "quantload GGUF schemes"),
    Runner("ggufpy.gguf_kernels", "kernels:ggufpy_gguf_kernels", ALTERNATIVE, "gguf-py (numpy) dequantize",
           requires=(_GGUF,)),
    Runner("machine.memcpy", "kernels:machine_memcpy", MACHINE, "torch copy_ of 256 MiB"),
]}

# --- metrics ------------------------------------------------------------------------------------------
def _load_s(target=None):
    return Metric("seconds", "load time", "s", "lower", target, f">= {target:g}x faster" if target else "")


def _rss(target=None, text=""):
    return Metric("peak_rss", "peak RSS", "bytes", "lower", target, text)


_WEIGHTS = Metric("model_bytes", "resident weights", "bytes", "lower")


def _tokens(target=None, text=""):
    return Metric("tokens_per_s", "greedy decode, 20 tokens", "per_s", "higher", target, text)


def _kernel(prefix: str, target: float):
    return (Metric(f"{prefix}.elements_per_s", "elements/s", "per_s", "higher", target, f">= {target:g}x"),
            Metric(f"{prefix}.gb_per_s", "bytes moved", "gb_per_s", "higher"))


CASES = [
    Case("memcpy", "memory copy (the physical reference)", "machine.memcpy", None,
         (Metric("copy_gb_per_s", "memcpy", "gb_per_s", "higher"),)),
    Case("gguf_load_smollm2", "GGUF SmolLM2-135M Q4_1 (98 MB) to a runnable model", "ql.gguf_smollm2",
         "hf.gguf_smollm2", (_load_s(10), _rss(1 / 3, "<= 1/3"), _WEIGHTS)),
    Case("gguf_load_gemma", "GGUF gemma-3-270m Q4_K_M (253 MB) to a runnable model", "ql.gguf_gemma",
         "hf.gguf_gemma", (_load_s(10), _rss(1 / 3, "<= 1/3"), _WEIGHTS)),
    Case("nf4_quantize_load", "bf16 SmolLM2 quantized to NF4 while loading", "ql.nf4_quantize_load",
         "hf.nf4_quantize_load", (_load_s(5), _rss(1.0, "no higher"), _WEIGHTS)),
    Case("nf4_prequantized_load", "pre-quantized NF4 checkpoint (its own dtype, bf16)", "ql.nf4_prequantized",
         "hf.nf4_prequantized", (_load_s(2), _rss(), _WEIGHTS)),
    Case("nf4_quantize_kernel", "NF4 quantize kernel, 4096x4096 bf16", "ql.nf4_kernels", "bnb.nf4_kernels",
         _kernel("quantize", 10), check="matches_bitsandbytes", check_label="bitsandbytes"),
    Case("nf4_dequantize_kernel", "NF4 dequantize kernel, 4096x4096 to bf16", "ql.nf4_kernels", "bnb.nf4_kernels",
         _kernel("dequantize", 1), check="matches_bitsandbytes", check_label="bitsandbytes"),
    Case("gguf_dequantize", "GGUF dequantize, 1024x4096 random valid blocks to float32", "ql.gguf_kernels",
         "ggufpy.gguf_kernels", _kernel("{part}", 5), parts=True,
         check="{part}.matches_gguf_py", check_label="gguf-py"),
    Case("decode_nf4", "greedy decode, quantload NF4 vs transformers + bnb NF4", "ql.nf4_decode",
         "hf.nf4_decode", (_tokens(4, ">= 4x"),)),
    Case("decode_int4", "greedy decode, quantload int4 affine vs transformers + bnb NF4", "ql.int4",
         "hf.nf4_decode", (_tokens(3, ">= 3x"),)),
    Case("decode_gguf_q4_1", "greedy decode, quantload GGUF Q4_1 (packed kernels) vs transformers + bnb NF4",
         "ql.gguf_decode",
         "hf.nf4_decode", (_tokens(3, ">= 3x"),)),
    Case("decode_int4_vs_dense", "greedy decode, quantload int4 affine vs transformers float32 dense", "ql.int4",
         "hf.dense", (_tokens(1.5, ">= 1.5x"),)),
    Case("decode_dense", "greedy decode, float32 dense: quantload vs transformers", "ql.dense", "hf.dense",
         (_tokens(),)),
    Case("decode_gguf_vs_hf_gguf", "greedy decode, GGUF Q4_1: quantload (blocks, exact path) vs transformers "
         "(dequantized)",
         "ql.gguf_smollm2", "hf.gguf_smollm2", (_tokens(),)),
]

# --- llama.cpp and the float model (issue #10's targets) -------------------------------------------------
def _decode32(target, text):
    return Metric("tokens_per_s", "greedy decode, 32 tokens", "per_s", "higher", target, text)


def _prefill(target, text):
    return Metric("tokens_prefill_per_s", "prefill, 256 tokens", "per_s", "higher", target, text)


_SAME_THREADS = "same GGUF file and threads on both sides (--threads, else the physical cores)"
CASES += [
    Case("llamacpp_decode_smollm2", "GGUF SmolLM2-135M Q4_1 greedy decode: quantload vs llama.cpp",
         "ql.decode_smollm2", "llama.decode_smollm2", (_decode32(0.5, ">= 0.5x"),), notes=(_SAME_THREADS,)),
    Case("llamacpp_prefill_smollm2", "GGUF SmolLM2-135M Q4_1 prefill of 256 tokens: quantload vs llama.cpp",
         "ql.prefill_smollm2", "llama.prefill_smollm2", (_prefill(0.5, ">= 0.5x"),), notes=(_SAME_THREADS,)),
    Case("llamacpp_decode_gemma", "GGUF gemma-3-270m Q4_K_M greedy decode: quantload vs llama.cpp",
         "ql.decode_gemma", "llama.decode_gemma", (_decode32(0.5, ">= 0.5x"),), notes=(_SAME_THREADS,)),
    Case("llamacpp_prefill_gemma", "GGUF gemma-3-270m Q4_K_M prefill of 256 tokens: quantload vs llama.cpp",
         "ql.prefill_gemma", "llama.prefill_gemma", (_prefill(0.5, ">= 0.5x"),), notes=(_SAME_THREADS,)),
    Case("decode_nf4_vs_dense", "greedy decode, quantload NF4 vs transformers float32 dense", "ql.nf4_decode",
         "hf.dense", (_tokens(1.5, ">= 1.5x"),)),
    Case("decode_awq_vs_dense", "greedy decode, quantload AWQ (GEMM, 4-bit group 64; round-to-nearest, "
         "bench/inputs.py) vs transformers float32 dense", "ql.awq", "hf.dense", (_tokens(1.5, ">= 1.5x"),)),
    Case("decode_gguf_q4_k_vs_dense", "greedy decode, quantload GGUF Q4_K_M (llama.cpp's quantize of SmolLM2: "
         "its 576-wide rows fall back to Q5_0, ffn_down is Q4_K/Q6_K) vs transformers float32 dense",
         "ql.gguf_q4_k_decode", "hf.dense", (_tokens(1.5, ">= 1.5x"),)),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# --- the scale series (python -m bench --scale 1.5b,7b): not in CASES, heavy --------------------------------
SCALE_SIZES = ("tiny", "1.5b", "7b")    # inputs.SCALE_CONFIGS; "tiny" is for smoke tests
SCALE_CASES: dict[str, list[Case]] = {}


def _scale_metrics(tokens_target=None, text=""):
    return (_load_s(), _rss(), Metric("peak_rss_decode", "peak RSS after decoding", "bytes", "lower"), _WEIGHTS,
            Metric("tokens_per_s", "greedy decode, 8 tokens", "per_s", "higher", tokens_target, text))


for _s in SCALE_SIZES:
    _ck, _gg = (f"scale_{_s}",), (f"scale_{_s}", f"scale_{_s}_gguf")
    RUNNERS.update({r.name: r for r in [
        Runner(f"ql.scale_nf4_{_s}", f"scale:ql_nf4:{_s}", QUANTLOAD, 'quantload.load(bf16, quantize="nf4")',
               needs=("bf16", *_ck)),
        Runner(f"hf.scale_nf4_{_s}", f"scale:hf_nf4:{_s}", ALTERNATIVE,
               "transformers + bitsandbytes BitsAndBytesConfig(nf4)", requires=(_BNB,), needs=("bf16", *_ck)),
        Runner(f"ql.scale_gguf_{_s}", f"scale:ql_gguf:{_s}", QUANTLOAD, "quantload.load(Q4_0 .gguf)",
               needs=("bf16", *_gg)),
        Runner(f"llama.scale_gguf_{_s}", f"scale:llama_gguf:{_s}", ALTERNATIVE, "llama.cpp (llama-cpp-python)",
               requires=(_LLAMA,), needs=("bf16", *_gg)),
    ]})
    SCALE_CASES[_s] = [
        Case(f"scale_nf4_{_s}", f"synthetic llama {_s}: bf16 quantized to NF4 while loading",
             f"ql.scale_nf4_{_s}", f"hf.scale_nf4_{_s}", _scale_metrics()),
        Case(f"scale_gguf_{_s}", f"synthetic llama {_s}: GGUF Q4_0 (quantload convert) loaded",
             f"ql.scale_gguf_{_s}", f"llama.scale_gguf_{_s}", _scale_metrics()),
    ]
ALL_CASES_BY_NAME = {**CASES_BY_NAME, **{c.name: c for cs in SCALE_CASES.values() for c in cs}}


def runners_of(case: Case) -> list[str]:
    return [r for r in (case.quantload, case.alternative) if r]
