"""GGUF files to running models: the real SmolLM2 Q4_1 stays in its blocks and generates what
transformers' GGUF path (float32) generates; tiny files of every mapped architecture load to the same
logits as transformers."""
import os
import sys

import numpy as np
import pytest
import torch
import transformers

import quantload
from quantload.runtime.modules import QEmbedding, QLinear

sys.path.insert(0, os.path.dirname(__file__))
import realmodels  # noqa: E402
from test_architectures import ARCHS, tiny_files  # noqa: E402,F401  (the tiny GGUF files, one per arch)
from test_interchange_bnb import greedy  # noqa: E402

@pytest.fixture(scope="module")
def gguf_path():
    return realmodels.smollm2_gguf()


@pytest.fixture(scope="module")
def ours(gguf_path):
    return quantload.load(gguf_path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def tok(gguf_path):
    return quantload.load_tokenizer(gguf_path)


def test_weights_stay_in_their_blocks(ours, gguf_path):
    size = os.path.getsize(gguf_path)
    assert ours.load_report.model_bytes <= 1.25 * size
    linears = [m for m in ours.modules() if isinstance(m, QLinear)]
    assert len(linears) == 30 * 7 + 1  # every projection, and the tied output head
    assert isinstance(ours.model.embed_tokens, QEmbedding)
    assert ours.lm_head.qweight is ours.model.embed_tokens.qweight  # tied: one copy of the blocks
    assert not any(isinstance(m, torch.nn.Linear) for m in ours.modules())


@pytest.mark.slow
def test_same_greedy_text_as_transformers_gguf_float32(ours, tok, gguf_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                            dtype=torch.float32)
    assert greedy(ours, tok) == greedy(ref, tok)


def test_dequantize_true_gives_a_float_model(gguf_path, ours):
    flat = quantload.load(gguf_path, dequantize=True, dtype=torch.float32, progress=False)
    assert not any(isinstance(m, (QLinear, QEmbedding)) for m in flat.modules())
    w = flat.model.layers[3].self_attn.q_proj.weight
    assert torch.equal(w, ours.model.layers[3].self_attn.q_proj.qweight.dequantize(torch.float32))
    ids = torch.tensor([[1, 600, 42, 7]])
    previous = quantload.set_exact(True)      # the dequantize-then-matmul numerics are a float model's
    try:
        with torch.no_grad():
            assert torch.equal(flat(ids).logits, ours(ids).logits)
    finally:
        quantload.set_exact(previous)


def test_cli_generate_default_model(capsys):
    from quantload.cli import main
    assert main(["generate", "--prompt", "What is 2+2?", "--chat", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "loaded" in err and "peak RSS" in err


@pytest.mark.parametrize("key", list(ARCHS))
def test_tiny_architectures_match_transformers(tiny_files, key):
    path = tiny_files[key]
    ours = quantload.load(path, dtype=torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if key in ("gemma2", "gemma3"):
        # transformers leaves query_pre_attn_scalar at its default; llama.cpp (and we) use head_dim
        for a, b in zip(ref.model.layers, ours.model.layers):
            a.self_attn.scaling = b.self_attn.scaling
    ids = torch.tensor([[1, 5, 9, 17, 3, 30]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_unknown_architecture_is_named(tmp_path):
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba9")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(quantload.UnsupportedError, match="mamba9"):
        quantload.load(tmp_path / "x.gguf", progress=False)


def test_tied_quantized_head_follows_its_offloaded_embedding(gguf_path, ours, tmp_path):
    """SmolLM2 ties lm_head to the Q4_1 token table: with the table on disk the head reads the same stash."""
    off = quantload.load(gguf_path, dtype=torch.float32, device_map={"": "cpu", "model.embed_tokens": "disk",
                                                                   "lm_head": "disk"},
                         offload_folder=tmp_path / "off", progress=False)
    assert off.lm_head.qweight.is_meta and off.model.embed_tokens.qweight.is_meta  # between forwards
    refs = off.offloader.qweights
    assert refs["lm_head"] is refs["model.embed_tokens"]  # one stash, pointing into the GGUF file
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    previous = quantload.set_exact(True)      # offloaded layers are not repacked: compare exact with exact
    try:
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, off(ids).logits)
    finally:
        quantload.set_exact(previous)


RESIDENT_PROBE = """
import re, sys
import quantload
m = quantload.load(sys.argv[1], progress=False)
total, cur = 0, False
for line in open("/proc/self/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        cur = line.rstrip().endswith(".gguf")
    elif cur and line.startswith("Rss:"):
        total += int(line.split()[1])
print(total)
"""


def test_loading_leaves_the_file_on_disk_until_used(gguf_path):
    """Blocks are views of the map: a load reads the metadata (then lets it go), copies the small norms
    with pread and keeps q/k in the file's row order; the 98 MB of weights stay on disk until a forward."""
    import subprocess
    r = subprocess.run([sys.executable, "-c", RESIDENT_PROBE, str(gguf_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    resident_kib = int(r.stdout.strip().splitlines()[-1])
    assert resident_kib < 2 * 1024, resident_kib
