"""Tiny GGUF files written by llama.cpp's own converter, for the architecture tests.

    model = transformers.GPT2LMHeadModel(config)             # a tiny random model
    save_tiny(model, d)                                       # save_pretrained + a tiny vocabulary
    [f32] = convert([(d, d / "m.f32.gguf")])                  # llama.cpp's convert_hf_to_gguf.py
    q8 = requantize(f32, d / "m.q8_0.gguf", "q8_0")           # the matrices in another block type
    logits = llama_cpp_logits(q8, [1, 5, 9])                  # llama.cpp's own forward pass

The converter is llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and its own
gguf-py), vendored in the llama-cpp-python sdist: `llama_cpp_source()` finds it under
$QUANTLOAD_LLAMA_CPP_DIR or `<repo>/.cache/llama.cpp-<version>`, fetching the sdist there once with
`pip download` (the temp dir when .cache is unusable; skipping the test, with the reason, when that is not possible). It runs in a
subprocess, so its gguf-py never meets the installed one. Only the vocabulary is ours: the converter
would need a real tokenizer whose pre-tokenizer hash it knows, so `set_vocab` writes a tiny byte-level
BPE vocabulary instead; every tensor name, layout, permutation and hyperparameter key is the
converter's.

`requantize` rewrites the matrices of a converted file with gguf-py's quantizers (Q8_0, Q4_0, ...)
or, for Q4_K, the small encoder below (gguf-py has no K-quant quantizer; any valid blocks serve, since
every reader is compared on the same bytes). `llama_cpp_logits` runs llama-cpp-python in a subprocess
(a ggml abort must not end the test session).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest

LLAMA_CPP_PYTHON = "0.3.36"
REPO = pathlib.Path(__file__).resolve().parents[1]
_MEMBERS = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


# --- the converter ------------------------------------------------------------------------------------
def llama_cpp_source() -> pathlib.Path:
    """The directory holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    env = os.environ.get("QUANTLOAD_LLAMA_CPP_DIR")
    if env:
        path = pathlib.Path(env)
        if not (path / "convert_hf_to_gguf.py").exists():
            pytest.skip(f"QUANTLOAD_LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py")
        return path
    cache = REPO / ".cache" / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    try:
        if (cache / "convert_hf_to_gguf.py").exists():
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError:   # no usable .cache in the checkout (read-only, a broken link): the temp dir then
        cache = pathlib.Path(tempfile.gettempdir()) / f"quantload-llama.cpp-{LLAMA_CPP_PYTHON}"
        if (cache / "convert_hf_to_gguf.py").exists():
            return cache
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
                           capture_output=True, text=True, timeout=600)
        sdists = list(pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            pytest.skip(f"llama.cpp's converter is not available: pip download llama-cpp-python=="
                        f"{LLAMA_CPP_PYTHON} failed ({r.stderr.strip()[-300:]})")
        out = pathlib.Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel.startswith(_MEMBERS):
                    member.name = rel[len("vendor/llama.cpp/"):]
                    tar.extract(member, out, filter="data")
        try:
            os.rename(out, cache)
        except OSError:   # another process got there first
            if not (cache / "convert_hf_to_gguf.py").exists():
                raise
    return cache


def tiny_vocab() -> dict:
    """A byte-level BPE vocabulary: <unk> <s> </s>, the 256 GPT-2 byte characters, one merge."""
    chars = [c for c in range(ord("!"), ord("~") + 1)] + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [c for c in range(256) if c not in chars]
    byte_chars = [chr(c) for c in chars] + [chr(256 + i) for i in range(len(extra))]
    tokens = ["<unk>", "<s>", "</s>"] + byte_chars + ["Ġt"]
    return {"tokens": tokens, "types": [3, 3, 3] + [1] * (len(tokens) - 3), "merges": ["Ġ t"],
            "bos": 1, "eos": 2, "unk": 0}


VOCAB_SIZE = len(tiny_vocab()["tokens"])   # 260


def save_tiny(model, directory) -> pathlib.Path:
    """`model.save_pretrained(directory)` (safetensors) and the vocabulary the converter will write."""
    directory = pathlib.Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = tiny_vocab()
    (directory / "tiny_vocab.json").write_text(json.dumps(vocab))
    # some converters read the vocabulary size from here (Gemma trims the embedding to it)
    (directory / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": [],
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(vocab["tokens"])}, "merges": vocab["merges"]}}))
    return directory


_CONVERT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import torch, gguf
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

def set_vocab(self):
    v = json.loads((self.dir_model / "tiny_vocab.json").read_text())
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
    w.add_token_list(v["tokens"]); w.add_token_types(v["types"]); w.add_token_merges(v["merges"])
    w.add_bos_token_id(v["bos"]); w.add_eos_token_id(v["eos"]); w.add_unk_token_id(v["unk"])

ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[sys.argv[2]]
for model_dir, out in json.loads(sys.argv[3]):
    model_dir = Path(model_dir)
    hparams = ModelBase.load_hparams(model_dir, False)
    cls = get_model_class(get_model_architecture(hparams, ModelType.TEXT))
    extra = {"no_mtp": True} if getattr(cls, "supports_mtp_export", False) else {}   # tiny models have no MTP block
    tiny = type(cls.__name__, (cls,), {"model_arch": cls.model_arch, "set_vocab": set_vocab, **extra})
    with torch.inference_mode():
        m = tiny(model_dir, ftype, Path(out), eager=True)
        m.write()
"""


def convert(jobs, outtype: str = "f32") -> list[pathlib.Path]:
    """Run llama.cpp's converter on each `(saved model dir, output .gguf)`, all in one subprocess."""
    src = llama_cpp_source()
    jobs = [(str(d), str(o)) for d, o in jobs]
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(src), outtype, json.dumps(jobs)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{r.stderr[-4000:]}")
    return [pathlib.Path(o) for _, o in jobs]


# --- other block types ---------------------------------------------------------------------------------
def _q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [n, 256k] -> Q4_K blocks (d, dmin, 12 bytes of 6-bit scales/mins, 128 nibble bytes)."""
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    scale = (x.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    df, mf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(np.divide(-lo, mf, out=np.zeros_like(lo), where=mf > 0)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.divide(x + (mf * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(np.round(q), 0, 15).astype(np.uint8)
    scales = np.zeros((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], 1)
    return out.reshape(rows.shape[0], -1)


def _quantizable(name: str, values: np.ndarray, block: int) -> bool:
    """llama.cpp's rule, roughly: 2-D weight matrices whose rows split into whole blocks; no norms."""
    return (values.ndim == 2 and name.endswith(".weight") and "norm" not in name
            and values.shape[-1] % block == 0)


def requantize(src, dst, ggml_type: str) -> pathlib.Path:
    """Copy a float GGUF (as `convert` writes it) with its matrices in `ggml_type` ("f16", "q8_0",
    "q4_0", "q4_1", "q5_0", "q5_1", "q4_k"); other tensors keep their float type."""
    import gguf
    from quantload.sources.gguf import GGUFSource

    qtype = gguf.GGMLQuantizationType[ggml_type.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    source = GGUFSource(str(src))
    try:
        w = gguf.GGUFWriter(str(dst), source.fields["general.architecture"])
        for key, value in source.fields.items():
            if key in ("general.architecture", "GGUF.version"):
                continue
            if key in source.array_types:
                sub = gguf.GGUFValueType(source.array_types[key])
                w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub)
            else:
                w.add_key_value(key, value, gguf.GGUFValueType(source.field_types[key]))
        for name in source.keys():
            values = source.get_typed(name).float().numpy()
            if not _quantizable(name, values, block):
                w.add_tensor(name, values.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.Q4_K:
                w.add_tensor(name, _q4_k(values), raw_dtype=qtype)
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, values.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    finally:
        source.close()
    return pathlib.Path(dst)


# --- llama.cpp's forward pass ---------------------------------------------------------------------------
_LOGITS = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
ids = json.loads(sys.argv[2])
import llama_cpp as L
dec = json.loads(sys.argv[4])
for i, path in enumerate(json.loads(sys.argv[1])):
    llm = Llama(model_path=path, n_ctx=max(32, len(ids)), n_batch=len(ids), logits_all=True, verbose=False,
                n_threads=1, type_k=0, type_v=0, seed=0)
    if L.llama_model_has_encoder(llm._model.model):   # T5: encode ids, then decode `dec` (all logits)
        llm._batch.set_batch(ids, n_past=0, logits_all=False)
        assert L.llama_encode(llm._ctx.ctx, llm._batch.batch) == 0
        llm._batch.set_batch(dec, n_past=0, logits_all=True)
        assert L.llama_decode(llm._ctx.ctx, llm._batch.batch) == 0
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(llm._model.model))
        out = np.ctypeslib.as_array(L.llama_get_logits(llm._ctx.ctx), shape=(len(dec), n_vocab)).copy()
    else:
        llm.eval(ids)
        out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    np.save(f"{sys.argv[3]}/{i}.npy", out)
    del llm
"""


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python imports here, else the reason it does not."""
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else f"llama-cpp-python is not importable: {r.stderr.strip()[-200:]}"


def llama_cpp_logits(path, ids, decoder_ids=(0,)) -> np.ndarray:
    """llama.cpp's logits (float32 [len(ids), vocab]) for `ids` from one model file (see below)."""
    return llama_cpp_logits_many([path], ids, decoder_ids)[0]


def llama_cpp_logits_many(paths, ids, decoder_ids=(0,)) -> list[np.ndarray]:
    """llama.cpp's logits (float32 [len(ids), vocab]) for `ids` from each model file, F32 KV cache, one
    thread, all in one subprocess; for an encoder-decoder (T5) `ids` are encoded and the logits are the
    decoder's for `decoder_ids`."""
    paths = [str(p) for p in paths]
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-c", _LOGITS, json.dumps(paths), json.dumps(list(map(int, ids))), tmp,
                            json.dumps(list(map(int, decoder_ids)))],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            raise RuntimeError(f"llama.cpp could not run {paths} (rc {r.returncode}):\n{r.stderr[-3000:]}")
        return [np.load(os.path.join(tmp, f"{i}.npy")) for i in range(len(paths))]
