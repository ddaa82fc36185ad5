"""quantize_(model, config) on a model in memory, and load(..., model=net) into a normally built net."""
import weakref

import pytest
import torch
import transformers

import quantload
from quantload.errors import ConfigError
from quantload.runtime.modules import QLinear

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama(path=None, seed=0, tie=False):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tie)).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))


def test_load_into_a_normally_built_net_replaces_its_random_weights(tmp_path):
    from safetensors.torch import save_file
    ref = mlp(0)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    net = mlp(1)  # real (random) parameters, not on meta
    model = quantload.load(tmp_path / "w.safetensors", model=net, progress=False)
    x = torch.randn(3, 64)
    assert torch.equal(ref(x), model(x))
    assert model.load_report.unexpected_keys == []


def test_load_into_a_normally_built_net_with_quantize(tmp_path):
    from safetensors.torch import save_file
    ref = mlp(0)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        skeleton = mlp(0)
    expect = quantload.load(tmp_path / "w.safetensors", model=skeleton, quantize="nf4", progress=False)
    got = quantload.load(tmp_path / "w.safetensors", model=mlp(1), quantize="nf4", progress=False)
    x = torch.randn(3, 64)
    assert isinstance(got[0], QLinear)
    assert torch.isfinite(got(x)).all()
    assert torch.equal(expect(x), got(x))
    assert torch.equal(got[0].bias, ref[0].bias)


def test_load_into_a_net_keeps_a_shared_parameter_shared(tmp_path):
    from safetensors.torch import save_file

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))
    torch.manual_seed(0)
    ref = Tied()
    save_file({"emb.weight": ref.emb.weight.detach().clone()}, tmp_path / "w.safetensors")
    torch.manual_seed(1)
    model = quantload.load(tmp_path / "w.safetensors", model=Tied(), progress=False)
    assert model.head.weight is model.emb.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(ref(ids), model(ids))


def test_quantize_matches_quantize_while_loading(tmp_path):
    tiny_llama(tmp_path / "m")
    expect = quantload.load(tmp_path / "m", quantize="nf4", progress=False)
    model = tiny_llama()
    old = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    out = quantload.quantize_(model, "nf4")
    assert out is model
    assert old() is None  # the float weight was let go
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, QLinear)
    e = expect.model.layers[0].mlp.down_proj
    for k in e.qweight.data:
        assert torch.equal(q.qweight.data[k], e.qweight.data[k]), k
    assert not isinstance(model.lm_head, QLinear)  # skipped like transformers' default
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert torch.equal(expect(ids).logits, model(ids).logits)
    assert model.config.quantization_config["bnb_4bit_quant_type"] == "nf4"
    assert model.num_parameters() == tiny_llama().num_parameters()


def test_quantize_a_plain_module_with_a_config_dict():
    net = mlp(0)
    x = torch.randn(3, 64)
    y = net(x)
    quantload.quantize_(net, {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_skip_modules": []})
    assert isinstance(net[0], QLinear) and isinstance(net[2], QLinear)
    assert torch.allclose(net(x), y, atol=0.05, rtol=0.05)


def test_quantize_refuses_meta_weights():
    with torch.device("meta"):
        net = mlp(0)
    with pytest.raises(ConfigError, match="meta device"):
        quantload.quantize_(net, "nf4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantize_on_cuda_stays_on_cuda():
    net = mlp(0).cuda()
    quantload.quantize_(net, "nf4")
    assert net[0].qweight.device.type == "cuda"
    assert net(torch.randn(2, 64, device="cuda")).device.type == "cuda"
