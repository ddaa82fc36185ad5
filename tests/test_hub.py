"""Hub ids resolved through huggingface_hub, against a cache laid out in the test (no network)."""
import shutil

import pytest
import torch
import transformers

import quantload
from quantload.errors import ConfigError, QuantloadError
from quantload.sources import hub

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def cached_repo(cache, repo, files: dict, *, commit=COMMIT, ref="main"):
    """huggingface_hub's cache layout: models--owner--name/{refs/<ref>, snapshots/<commit>/<files>}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if isinstance(src, bytes):
            (snap / name).write_bytes(src)
        else:
            shutil.copy(src, snap / name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def tiny(path, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(path)
    return model


def test_repo_id_loads_from_the_offline_cache(tmp_path, offline_cache):
    ref = tiny(tmp_path / "m")
    cached_repo(offline_cache, "someone/tiny-llama", {"config.json": tmp_path / "m" / "config.json",
                                                       "model.safetensors": tmp_path / "m" / "model.safetensors"})
    model = quantload.load("someone/tiny-llama", progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.load_report.path.endswith(COMMIT)
    assert quantload.inspect("someone/tiny-llama").tensors == len(ref.state_dict())


def test_revision_picks_its_snapshot(tmp_path, offline_cache):
    tiny(tmp_path / "a", seed=0)
    ref_b = tiny(tmp_path / "b", seed=1)
    files = lambda d: {"config.json": d / "config.json", "model.safetensors": d / "model.safetensors"}  # noqa: E731
    cached_repo(offline_cache, "someone/tiny", files(tmp_path / "a"))
    cached_repo(offline_cache, "someone/tiny", files(tmp_path / "b"), commit=OTHER, ref="v2")
    model = quantload.load("someone/tiny", revision="v2", progress=False)
    assert torch.equal(model.lm_head.weight, ref_b.lm_head.weight)


def test_gguf_filename_picks_one_file(offline_cache):
    snap = cached_repo(offline_cache, "someone/tiny-GGUF", {"tiny.Q4_0.gguf": b"GGUF0", "tiny.Q8_0.gguf": b"GGUF1"})
    assert hub.resolve("someone/tiny-GGUF", filename="tiny.Q8_0.gguf") == str(snap / "tiny.Q8_0.gguf")
    with pytest.raises(ConfigError, match=r"2 GGUF files; pass filename= .*tiny.Q4_0.gguf"):
        hub.resolve("someone/tiny-GGUF")


def test_offline_and_not_cached_is_one_clear_error(offline_cache):
    with pytest.raises(QuantloadError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        quantload.load("HuggingFaceTB/SmolLM2-135M-Instruct", progress=False)


def test_a_missing_local_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(QuantloadError, match="no such file"):
        quantload.load(str(tmp_path / "nowhere" / "model.safetensors"), progress=False)


def test_online_downloads_only_what_a_load_reads(tmp_path, monkeypatch):
    import huggingface_hub as hf
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    names = ["config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "README.md",
             "onnx/model.onnx", "tokenizer.json", "tokenizer_config.json", "flax_model.msgpack"]
    calls = {}
    monkeypatch.setattr(hf.HfApi, "list_repo_files", lambda self, repo, revision=None, **kw: names)

    def snapshot_download(repo, *, allow_patterns=None, revision=None, cache_dir=None, **kw):
        calls.update(repo=repo, allow=allow_patterns, revision=revision, cache_dir=cache_dir)
        return str(tmp_path / "snap")
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    assert hub.resolve("someone/model", revision="abc") == str(tmp_path / "snap")
    assert sorted(calls["allow"]) == ["config.json", "generation_config.json", "model.safetensors",
                                      "tokenizer.json", "tokenizer_config.json"]
    assert calls["revision"] == "abc" and calls["cache_dir"] == str(tmp_path)
