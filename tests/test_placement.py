"""The placement planner against fake machines: budgets, no-split blocks, tied weights, balance, errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantload.errors import ConfigError, PlacementError
from quantload.placement import (DeviceInfo, Plan, estimate_runtime_bytes, parse_max_memory, parse_memory,
                                 plan_placement, tensor_sizes)

KB = 1000


class Block(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, f), nn.Linear(f, d))


class Toy(nn.Module):
    """embedding, uneven no-split blocks, norm, a root buffer, an lm head tied to the embedding."""

    _no_split_modules = ["Block"]   # read by the planner, as transformers models declare it

    def __init__(self, ffs, vocab=256, d=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, f) for f in ffs)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("pos", torch.zeros(16, d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight


FFS = (64, 128, 96, 256, 64, 160, 128, 64, 192, 96, 128, 64)


def toy(ffs=FFS, **kw) -> Toy:
    with torch.device("meta"):
        return Toy(ffs, **kw)


def quantized_sizes(model) -> dict[str, int]:
    """NF4-like sizes for the blocks' Linear weights (packed 4-bit + one fp32 absmax per 64), bf16 else."""
    sizes = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name.startswith("layers.") and name.endswith(".weight") and t.ndim == 2:
            sizes[name] = t.numel() // 2 + (t.numel() // 64) * 4
        else:
            sizes[name] = t.numel() * 2
    return sizes


def machine(*gpus, cpu=10**9, disk=10**12):
    return [*(DeviceInfo(f"cuda:{i}", c) for i, c in enumerate(gpus)), DeviceInfo("cpu", cpu),
            DeviceInfo("disk", disk)]


def unit_sizes(model, sizes):
    """Bytes of each placement unit that must stay whole: the blocks, and the embedding with its tied head."""
    units = {f"layers.{i}": sum(v for k, v in sizes.items() if k.startswith(f"layers.{i}."))
             for i in range(len(model.layers))}
    units["embed"] = sizes["embed.weight"]
    return units


def check_invariants(plan: Plan, model, sizes, ties=(("embed.weight", "head.weight"),), block_cls="Block"):
    counted = {t[i] for t in ties for i in range(1, len(t))}
    per_device: dict[str, int] = {}
    for name, nbytes in sizes.items():
        dev = plan.device_of(name)
        assert dev in {d.name for d in plan.devices}
        if name not in counted:
            per_device[dev] = per_device.get(dev, 0) + nbytes
    for d in plan.devices:
        assert d.weights == per_device.get(d.name, 0), d.name
        assert d.weights + d.kv_cache + d.reserved <= d.budget, f"{d.name} over budget"
        assert d.free >= 0
    for name, mod in model.named_modules():
        if type(mod).__name__ == block_cls:
            devs = {plan.device_of(f"{name}.{p}") for p, _ in mod.named_parameters()}
            assert len(devs) == 1, f"{name} split over {devs}"
    for group in ties:
        assert len({plan.device_of(n) for n in group}) == 1, f"{group} not together"


def layer_devices(plan, model):
    return [plan.device_of(f"layers.{i}.attn.weight") for i in range(len(model.layers))]


ORDER = {"cuda:0": 0, "cuda:1": 1, "cuda:2": 2, "cpu": 3, "disk": 4}


# --- memory strings ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (1024, 1024), ("1024", 1024), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1.5GB", 1_500_000_000),
    ("3 kib", 3072), ("7B", 7), ("0", 0), ("2TiB", 2 * 2**40), (".5MiB", 2**19),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("junk", ["lots", "2GG", "-1GB", "", "GiB", -5, 1.5, None, True, "1e9"])
def test_parse_memory_junk(junk):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_memory(junk)


def test_parse_max_memory_cli_form():
    assert parse_max_memory("cuda:0=2GiB,cpu=10GB disk=1TB") == {"cuda:0": 2 * 2**30, "cpu": 10**10,
                                                                  "disk": 10**12}
    for bad, fragment in [("cuda:0", "is not DEVICE=SIZE"), ("=2GiB", "is not DEVICE=SIZE"), (" , ", "names no device"),
                          ("cpu=much", "max memory for 'cpu' 'much' is not a size")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_max_memory(bad)


# --- the modes ----------------------------------------------------------------------------------

def test_balanced_spreads_within_one_block_of_even():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    # three GPUs of different sizes, each big enough for its even share plus the 10% headroom
    devs = machine(int(total * 0.6), int(total * 0.8), int(total * 1.1))
    for mode in ("auto", "balanced"):
        plan = plan_placement(model, sizes, mode, devices=devs)
        check_invariants(plan, model, sizes)
        gpus = [d for d in plan.devices if d.name.startswith("cuda")]
        assert len(gpus) == 3 and sum(d.weights for d in gpus) == total
        largest = max(unit_sizes(model, sizes).values())
        for d in gpus:
            assert abs(d.weights - total / 3) <= largest, (mode, d.name, d.weights, total / 3)
        assert "10% of the budget on each of cuda:0, cuda:1, cuda:2" in plan.headroom_rule
        devices = layer_devices(plan, model)
        assert [ORDER[d] for d in devices] == sorted(ORDER[d] for d in devices)


@pytest.mark.parametrize("n_gpus", [2, 3, 5, 7])
def test_balanced_within_one_block_for_many_uneven_models(n_gpus):
    gen = torch.Generator().manual_seed(n_gpus)
    for _ in range(6):
        ffs = (torch.randint(1, 9, (int(torch.randint(8, 30, (1,), generator=gen)),), generator=gen) * 32).tolist()
        model = toy(ffs, vocab=64)
        sizes = quantized_sizes(model)
        total = sum(v for k, v in sizes.items() if k != "head.weight")
        caps = (torch.rand(n_gpus, generator=gen) * total + 1.2 * total / n_gpus).long().tolist()
        plan = plan_placement(model, sizes, "balanced", devices=machine(*caps), headroom=0)
        check_invariants(plan, model, sizes)
        largest = max(unit_sizes(model, sizes).values())
        weights = [d.weights for d in plan.devices[:n_gpus]]
        assert sum(weights) == total
        assert max(abs(w - total / n_gpus) for w in weights) <= largest, (ffs, caps, weights)


def test_balanced_fills_a_small_gpu_and_evens_out_the_rest():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    devs = machine(int(total * 0.2), total, total)
    plan = plan_placement(model, sizes, "balanced", devices=devs)
    check_invariants(plan, model, sizes)
    g0, g1, g2 = plan.devices[:3]
    largest = max(unit_sizes(model, sizes).values())
    assert g0.budget - g0.reserved - g0.weights < largest      # the small GPU is filled
    rest = (total - g0.weights) / 2
    assert abs(g1.weights - rest) <= largest and abs(g2.weights - rest) <= largest


def test_sequential_fills_gpu0_first_and_keeps_layer_order():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    devs = machine(int(total * 0.5), int(total * 0.5), int(total * 0.5))
    plan = plan_placement(model, sizes, "sequential", devices=devs)
    check_invariants(plan, model, sizes)
    devices = layer_devices(plan, model)
    assert [ORDER[d] for d in devices] == sorted(ORDER[d] for d in devices)
    g0 = plan.devices[0]
    nxt = devices.index("cuda:1")   # the first block that went on: it did not fit on GPU 0
    assert g0.weights + unit_sizes(model, sizes)[f"layers.{nxt}"] > g0.budget - g0.reserved
    assert g0.weights > plan.devices[1].weights   # not balanced: GPU 0 took what it could


def test_balanced_low_0_keeps_gpu0_empty_when_the_others_suffice():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    devs = machine(total * 2, total, total)
    plan = plan_placement(model, sizes, "balanced_low_0", devices=devs)
    check_invariants(plan, model, sizes)
    g0, g1, g2 = plan.devices[:3]
    assert g0.weights == 0 and g1.weights + g2.weights == total
    largest = max(unit_sizes(model, sizes).values())
    assert abs(g1.weights - g2.weights) <= 2 * largest
    assert not plan.warnings   # an empty GPU 0 is the point of the mode, not a surprise


def test_balanced_low_0_puts_on_gpu0_only_what_the_others_cannot_hold():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    devs = machine(total * 2, int(total * 0.4), int(total * 0.4))
    plan = plan_placement(model, sizes, "balanced_low_0", devices=devs)
    check_invariants(plan, model, sizes)
    g0, g1, g2 = plan.devices[:3]
    assert 0 < g0.weights < total * 0.5
    assert g0.weights < g1.weights + g2.weights


def test_spill_to_cpu_then_disk_reserves_room_to_run_offloaded_blocks(tmp_path):
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    units = unit_sizes(model, sizes)
    devs = machine(int(total * 0.3), int(total * 0.2), int(total * 0.1), cpu=int(total * 0.2))
    plan = plan_placement(model, sizes, "auto", devices=devs, offload_folder=tmp_path)
    check_invariants(plan, model, sizes)
    by = {d.name: d for d in plan.devices}
    assert by["cpu"].weights > 0 and by["disk"].weights > 0
    offloaded = [nbytes for unit, nbytes in units.items()
                 if plan.device_of(f"{unit}.weight" if unit == "embed" else f"{unit}.attn.weight") in ("cpu", "disk")]
    # cuda:0 keeps its 10% plus room for the largest offloaded block, and says so
    assert by["cuda:0"].reserved == int(by["cuda:0"].budget * 0.1) + max(offloaded)
    assert "largest offloaded module" in plan.headroom_rule
    assert plan.offload_folder == str(tmp_path)
    devices = layer_devices(plan, model)
    assert [ORDER[d] for d in devices] == sorted(ORDER[d] for d in devices)


def test_an_outsized_embedding_does_not_leave_a_gpu_empty():
    # an unquantized embedding larger than GPU 0 (accelerate#2586): it moves on, the blocks still use GPU 0
    model = toy(vocab=4096)
    sizes = quantized_sizes(model)
    devs = machine(sizes["embed.weight"] // 2, sizes["embed.weight"] * 4)
    plan = plan_placement(model, sizes, "sequential", devices=devs)
    check_invariants(plan, model, sizes)
    assert plan.device_of("embed.weight") == "cuda:1"
    assert plan.device_of("layers.0.attn.weight") == "cuda:0"


def test_ties_given_by_name_are_counted_once_and_kept_together():
    model = toy()
    with torch.device("meta"):
        model.head.weight = nn.Parameter(torch.empty(256, 32))   # untied: only the caller knows
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    plan = plan_placement(model, sizes, "balanced", devices=machine(total, total, total),
                          tied_groups=[["head.weight", "embed.weight"]])
    check_invariants(plan, model, sizes)
    assert plan.total_bytes == total
    assert "head" in plan.devices[0].units   # placed with the embedding, at the front


def test_a_gpu_too_small_for_any_block_is_reported():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    assert sizes["pos"] > 1000 and min(unit_sizes(model, sizes).values()) > 1000
    plan = plan_placement(model, sizes, "sequential", {"cuda:1": 0}, devices=machine(1000, total, total * 2))
    check_invariants(plan, model, sizes)
    assert plan.devices[0].weights == 0 and "cuda:1" not in {d.name for d in plan.devices}
    assert any(w.startswith("cuda:0 received nothing") for w in plan.warnings)


def test_single_device_and_device_names():
    model = toy()
    sizes = quantized_sizes(model)
    devs = machine(10**6, 10**6)
    assert plan_placement(model, sizes, "cpu", devices=devs).device_map == {"": "cpu"}
    assert plan_placement(model, sizes, 1, devices=devs).device_map == {"": "cuda:1"}
    assert plan_placement(model, sizes, "cuda", devices=devs).device_map == {"": "cuda:0"}
    assert plan_placement(model, sizes, torch.device("cuda", 1), devices=devs).device_of("norm.bias") == "cuda:1"


def test_max_memory_limits_and_excludes_devices():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    devs = machine(10 * total, 10 * total, 10 * total)
    plan = plan_placement(model, sizes, "sequential", {0: int(total * 0.4), "cuda:1": 0, "cuda:2": "1GiB"},
                          devices=devs)
    check_invariants(plan, model, sizes)
    by = {d.name: d for d in plan.devices}
    assert by["cuda:0"].budget == int(total * 0.4) and "cuda:1" not in by
    assert by["cuda:2"].budget == 10 * total   # more than is free is clamped to what is free
    assert by["cuda:0"].weights > 0 and by["cuda:2"].weights > 0


def test_headroom_forms():
    model = toy()
    sizes = quantized_sizes(model)
    devs = machine(10**6, 10**6)
    plan = plan_placement(model, sizes, "balanced", devices=devs, headroom="100KB")
    assert [d.reserved for d in plan.devices[:2]] == [100 * KB, 100 * KB] and "as asked" in plan.headroom_rule
    plan = plan_placement(model, sizes, "balanced", devices=devs, headroom=0.25)
    assert plan.devices[0].reserved == 250 * KB
    plan = plan_placement(model, sizes, "balanced", devices=devs, headroom={"cuda:1": 5000})
    assert [d.reserved for d in plan.devices[:2]] == [0, 5000]
    with pytest.raises(ConfigError, match="fraction"):
        plan_placement(model, sizes, devices=devs, headroom=1.5)
    with pytest.raises(ConfigError, match="is not a size"):
        plan_placement(model, sizes, devices=devs, headroom="roomy")


# --- explicit dicts -----------------------------------------------------------------------------

def test_dict_longest_prefix_wins():
    model = toy()
    sizes = quantized_sizes(model)
    plan = plan_placement(model, sizes, {"": "cpu", "layers": 0, "layers.3": "cuda:1", "layers.3.mlp.1": 1},
                          devices=machine(10**6, 10**6))
    assert plan.device_of("layers.2.mlp.0.weight") == "cuda:0"
    assert plan.device_of("layers.3.attn.bias") == "cuda:1"
    assert plan.device_of("embed.weight") == "cpu" and plan.device_of("pos") == "cpu"
    assert plan.mode == "dict"
    check_invariants(plan, model, sizes)


def test_dict_that_leaves_tensors_unplaced():
    model = toy()
    sizes = quantized_sizes(model)
    with pytest.raises(PlacementError, match=r"leaves 3 tensor\(s\) \(1.12 KiB\).*: pos, norm.weight, norm.bias;"):
        plan_placement(model, sizes, {"embed": 0, "layers": 1, "head": 0}, devices=machine(10**6, 10**6))
    with pytest.raises(PlacementError, match=r"and \d+ more"):
        plan_placement(model, sizes, {"embed": 0, "head": 0}, devices=machine(10**6))


def test_dict_errors():
    model = toy()
    sizes = quantized_sizes(model)
    devs = machine(10**6, 10**6)
    with pytest.raises(PlacementError, match="tied tensors embed.weight, head.weight"):
        plan_placement(model, sizes, {"": 0, "head": 1}, devices=devs)
    with pytest.raises(ConfigError, match="neither a module nor a tensor"):
        plan_placement(model, sizes, {"": 0, "layers.99": 1}, devices=devs)
    with pytest.raises(PlacementError, match=r"puts .* on cuda:0 .* budget is 1000 B"):
        plan_placement(model, sizes, {"": 0}, devices=machine(1000, 10**6))
    with pytest.raises(ConfigError, match="no offload_folder"):
        plan_placement(model, sizes, {"": 0, "layers.5": "disk"}, devices=devs)


def test_dict_that_splits_a_block_is_warned_about(tmp_path):
    model = toy()
    sizes = quantized_sizes(model)
    plan = plan_placement(model, sizes, {"": 0, "layers.2.mlp": "disk"}, devices=machine(10**6),
                          offload_folder=tmp_path)
    assert plan.device_of("layers.2.mlp.1.weight") == "disk"
    assert any("'layers.2' (Block, kept whole: no-split) is split over cuda:0, disk" in w for w in plan.warnings)


# --- bad input ----------------------------------------------------------------------------------

def test_devices_that_do_not_exist():
    model = toy()
    sizes = quantized_sizes(model)
    devs = machine(10**6, 10**6)
    with pytest.raises(PlacementError, match=r"device_map 'cuda:3' does not exist on this machine; "
                                             r"devices here: cuda:0, cuda:1, cpu, disk"):
        plan_placement(model, sizes, "cuda:3", devices=devs)
    with pytest.raises(PlacementError, match=r"'tpu' is neither a mode \(auto, balanced"):
        plan_placement(model, sizes, "tpu", devices=devs)
    with pytest.raises(PlacementError, match="max_memory device 'cuda:7' does not exist"):
        plan_placement(model, sizes, max_memory={"cuda:7": "1GiB"}, devices=devs)
    with pytest.raises(PlacementError, match=r"device_map\['layers'\] 5 does not exist"):
        plan_placement(model, sizes, {"": 0, "layers": 5}, devices=devs)
    with pytest.raises(ConfigError, match=r"max_memory\['cpu'\] 'lots' is not a size"):
        plan_placement(model, sizes, max_memory={"cpu": "lots"}, devices=devs)


def test_disk_needs_an_offload_folder():
    model = toy()
    sizes = quantized_sizes(model)
    devs = machine(10**6)
    with pytest.raises(ConfigError, match="puts .* on 'disk' but no offload_folder"):
        plan_placement(model, sizes, "disk", devices=devs)
    with pytest.raises(ConfigError, match="budget for 'disk' but no offload_folder"):
        plan_placement(model, sizes, max_memory={"disk": "1GB"}, devices=devs)


def test_model_too_big_without_disk_says_what_would_fit():
    model = toy()
    sizes = quantized_sizes(model)
    total = sum(v for k, v in sizes.items() if k != "head.weight")
    with pytest.raises(PlacementError, match=r"cannot place .*model needs .* in all.*offload_folder") as e:
        plan_placement(model, sizes, devices=machine(int(total * 0.3), cpu=int(total * 0.3)))
    assert e.value.key is not None


def test_budget_too_small_for_one_block(tmp_path):
    model = toy(vocab=16)
    sizes = quantized_sizes(model)
    block = unit_sizes(model, sizes)["layers.0"]
    devs = machine(block // 2, cpu=block // 2, disk=block // 2)
    with pytest.raises(PlacementError, match=r"'layers.0' \(Block, kept whole: no-split\): it needs "
                                             r".*a device needs a budget of at least") as e:
        plan_placement(model, sizes, "sequential", devices=devs, offload_folder=tmp_path)
    assert e.value.key == "layers.0"


def test_bad_sizes_and_ties():
    model = toy()
    devs = machine(10**6)
    with pytest.raises(ConfigError, match="no module 'nowhere'"):
        plan_placement(model, {"nowhere.weight": 5}, devices=devs)
    with pytest.raises(ConfigError, match="expected a non-negative int"):
        plan_placement(model, {"norm.weight": -1}, devices=devs)
    with pytest.raises(ConfigError, match="not a tensor of the model"):
        plan_placement(model, devices=devs, tied_groups=[["embed.weight", "ghost.weight"]])
    plan = plan_placement(model, devices=devs)
    with pytest.raises(PlacementError, match="no device for 'nowhere.weight'"):
        Plan("dict", {"layers": "cpu"}, plan.devices, "", 0).device_of("nowhere.weight")


# --- sizes from the model and its quantized modules ---------------------------------------------

class FakeScheme:
    name = "fake4"
    param_name = "weight"

    def nbytes_for(self, shape, dtype):
        return shape[0] * shape[1] // 2 + shape[0] * 4


def test_tensor_sizes_asks_quantized_modules_and_counts_ties_once():
    from quantload.runtime.modules import QLinear
    model = toy()
    model.layers[0].attn = QLinear(32, 32, True, FakeScheme(), dtype=torch.bfloat16)
    sizes = tensor_sizes(model)
    assert sizes["layers.0.attn.weight"] == 32 * 16 + 32 * 4
    assert sizes["layers.0.attn.bias"] == 32 * 2            # bf16 bias, as the module holds it
    assert sizes["layers.1.attn.weight"] == 32 * 32 * 4     # float32 skeleton
    # model order: the root's own buffer, then module by module, a quantized weight after its bias
    assert list(sizes)[:4] == ["pos", "embed.weight", "layers.0.attn.bias", "layers.0.attn.weight"]
    plan = plan_placement(model, devices=machine(10**7))
    assert plan.total_bytes == sum(sizes.values()) - sizes["head.weight"]
    assert plan.device_map == {"": "cuda:0"}
    by_callable = tensor_sizes(model, lambda name, t: 1 if name == "norm.weight" else None)
    assert by_callable["norm.weight"] == 1 and by_callable["norm.bias"] == 32 * 4


# --- a real transformers model on meta ----------------------------------------------------------

def tiny_llama(layers=6, tie=True):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_llama_on_meta_balanced_with_kv_cache():
    model = tiny_llama()
    sizes = tensor_sizes(model)
    total = sum(sizes.values()) - sizes["lm_head.weight"]
    kv_per_layer, activations = estimate_runtime_bytes(model.config, context_tokens=256, dtype=torch.float32)
    assert kv_per_layer == 2 * 2 * 16 * 256 * 4       # k and v, 2 kv heads x 16 dims, 256 tokens, fp32
    devs = machine(*[total + activations] * 3)
    plan = plan_placement(model, device_map="auto", devices=devs, context_tokens=256)
    assert "per layer for 1 x 256 tokens" in plan.headroom_rule
    gpus = plan.devices[:3]
    assert sum(d.kv_cache for d in gpus) == 6 * kv_per_layer and all(d.reserved == activations for d in gpus)
    assert all(d.weights > 0 for d in gpus)
    check_invariants(plan, model, sizes, ties=(("model.embed_tokens.weight", "lm_head.weight"),),
                     block_cls="LlamaDecoderLayer")
    for i in range(6):   # the KV cache of a layer is charged where the layer is
        dev = plan.device_of(f"model.layers.{i}.mlp.up_proj.weight")
        assert f"model.layers.{i}" in next(d for d in plan.devices if d.name == dev).units
    table = plan.to_table()
    assert "cuda:0" in table and "kv cache" in table and "model.layers." in table
    json.dumps(plan.to_dict())


def test_llama_sequential_spills_and_never_splits_a_decoder_layer(tmp_path):
    model = tiny_llama(layers=8, tie=False)
    sizes = tensor_sizes(model)
    total = sum(sizes.values())
    devs = machine(total // 4, total // 4, cpu=total // 4, disk=total)
    plan = plan_placement(model, device_map="sequential", devices=devs, offload_folder=tmp_path,
                          context_tokens=16)
    check_invariants(plan, model, sizes, ties=(), block_cls="LlamaDecoderLayer")
    order = [ORDER[plan.device_of(f"model.layers.{i}.self_attn.q_proj.weight")] for i in range(8)]
    assert order == sorted(order) and order[-1] >= 3
    # offloaded layers run on cuda:0, so their KV cache is charged there, not to the CPU or disk
    kv_per_layer, _ = estimate_runtime_bytes(model.config, context_tokens=16, dtype=torch.float32)
    by = {d.name: d for d in plan.devices}
    offloaded = sum(1 for o in order if o >= 3)
    assert by["cpu"].kv_cache == 0 and by["disk"].kv_cache == 0
    assert by["cuda:0"].kv_cache == (order.count(0) + offloaded) * kv_per_layer
    assert f"KV cache of the {offloaded} offloaded layers" in plan.headroom_rule


def test_a_gpu_crowded_out_by_its_reservation_plans_for_the_cpu(tmp_path):
    """A GPU budget too small for one block beside the room kept for offloaded modules gets nothing: the
    model then runs on the CPU, which must also hold the KV cache of the layers on disk (it used to be
    charged to "disk", and the CPU's budget was exceeded at run time)."""
    model = tiny_llama(layers=8, tie=False)
    sizes = tensor_sizes(model)
    total = sum(sizes.values())
    kv_per_layer, activations = estimate_runtime_bytes(model.config, context_tokens=64, dtype=torch.float32)
    block = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
    plan = plan_placement(model, device_map="auto", devices=machine(activations + block, cpu=total // 3,
                                                                     disk=10 * total),
                          offload_folder=tmp_path, context_tokens=64)
    assert "cuda:0" not in plan.device_map.values()
    assert any("cuda:0" in w and "runs on the CPU" in w for w in plan.warnings)
    by = {d.name: d for d in plan.devices}
    assert by["disk"].kv_cache == 0 and by["cpu"].kv_cache == 8 * kv_per_layer
    assert by["cpu"].weights + by["cpu"].kv_cache + by["cpu"].reserved <= by["cpu"].budget
    check_invariants(plan, model, sizes, ties=(), block_cls="LlamaDecoderLayer")
