"""Crash safety of saves at checkpoint level: kill -9 at every named step of a save, and SIGXFSZ after k
bytes of a file, then the target must load as exactly the old checkpoint or exactly the new one (every
tensor and config.json compared), never a mix, never unloadable; the next save cleans what the kill left.

Each kill runs the save in a forked child: a hook in writers/staging.py SIGKILLs the child at one named
step (deterministic: the steps are first recorded from a complete save), or RLIMIT_FSIZE kills it when
a file reaches k bytes. Scenarios: single -> single, sharded -> sharded (same and other shard names),
sharded -> single, single -> sharded, nothing -> checkpoint, GGUF -> GGUF, and the two fallbacks (no
RENAME_EXCHANGE; no sibling folder possible).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import sys
import time
import traceback

import pytest
import torch
import transformers

import quantload
from quantload.writers import staging
from quantload.writers.safetensors_writer import checkpoint_tensors

KILL_EXIT_TIMEOUT_S = 60


def tiny(seed: int, eps: float):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, rms_norm_eps=eps, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # norms are all ones at init: make every tensor tell the two saves apart
        for p in model.parameters():
            p.add_(torch.rand_like(p))
    return model


OLD, NEW = tiny(0, 1e-5), tiny(1, 1e-6)
SINGLE, SHARDED3, SHARDED5 = 10**9, 40_000, 20_000


def save(model, out, shard=SINGLE):
    if str(out).endswith(".gguf"):
        return quantload.save(model, out, quantize="f32")
    return quantload.save(model, out, max_shard_size=shard)


def _same(model_sd, ref) -> bool:
    return all(torch.equal(model_sd[k], v) for k, v in checkpoint_tensors(ref).items())


def outcome(out: str, load_from: str) -> str:
    """'old', 'new' or 'absent'; anything else (a mix, unloadable) fails the test."""
    if not os.path.exists(out):
        return "absent"
    gguf = out.endswith(".gguf")
    model = quantload.load(load_from, progress=False, dequantize=True) if gguf else \
        quantload.load(load_from, progress=False)
    sd = model.state_dict()
    is_old, is_new = _same(sd, OLD), _same(sd, NEW)
    if not gguf:
        with open(os.path.join(out, "config.json")) as f:
            eps = json.load(f)["rms_norm_eps"]
        is_old, is_new = is_old and eps == 1e-5, is_new and eps == 1e-6
    assert is_old != is_new, f"{out} holds a mix of the two saves (old tensors: {_same(sd, OLD)}, " \
                             f"new tensors: {_same(sd, NEW)})"
    return "old" if is_old else "new"


def run_child(fn) -> int:
    """Run fn() in a forked child; return the signal that ended it (0 for a normal exit)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            traceback.print_exc()
            code = 3
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + KILL_EXIT_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the save hung")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child"
    return 0


def recorded_steps(setup, new_save) -> list[str]:
    names: list[str] = []
    setup()
    staging.crash_hook = names.append
    try:
        new_save()
    finally:
        staging.crash_hook = None
    return names


def kill_at(step_name: str, new_save, patch=None):
    def child():
        if patch:
            patch()

        def hook(name):
            if name == step_name:
                os.kill(os.getpid(), signal.SIGKILL)
        staging.crash_hook = hook
        new_save()
    return run_child(child)


def kill_after_bytes(k: int, new_save):
    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # Python ignores it; the default is to die
        resource.setrlimit(resource.RLIMIT_FSIZE, (k, resource.RLIM_INFINITY))
        new_save()
    return run_child(child)


def hidden_entries(out: str) -> list[str]:
    parent = os.path.dirname(out)
    found = [n for n in os.listdir(parent) if n.startswith(".")]
    if os.path.isdir(out):
        found += [n for n in os.listdir(out) if n.startswith(".")]
    return found


def exercise(tmp_path, old_shard, new_shard, gguf=False, patch=None, extra_outcomes=()):
    """Kill a save of NEW over OLD at every step and at two byte counts; return {kill point: outcome}."""
    root = tmp_path / "ckpts"
    out = str(root / ("m.gguf" if gguf else "m"))
    load_from = str(root) if gguf else out   # a GGUF is found by scanning its folder

    def setup():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        if old_shard is not None:
            save(OLD, out, old_shard)
            if not gguf:
                with open(os.path.join(out, "README.md"), "w") as f:
                    f.write("the user's own file")

    def new_save():
        if patch:
            patch()
        save(NEW, out, new_shard)

    steps = recorded_steps(setup, new_save)
    assert outcome(out, load_from) == "new"
    assert steps[0] == "staged" and "before-switch" in steps and "switched" in steps
    results = {}
    switched_at = steps.index("switched")
    for i, name in enumerate(steps):
        setup()
        sig = kill_at(name, new_save, patch)
        assert sig == signal.SIGKILL, f"no kill at {name!r}"
        got = outcome(out, load_from)
        results[name] = got
        if (name, got) in extra_outcomes:
            continue
        assert got == ("new" if i >= switched_at else "old" if old_shard is not None else "absent"), name
        if got != "absent" and not gguf and old_shard is not None:
            with open(os.path.join(out, "README.md")) as f:
                assert f.read() == "the user's own file"
        # the next save cleans what the kill left, and succeeds
        save(NEW, out, new_shard)
        assert outcome(out, load_from) == "new" and hidden_entries(out) == [], name
    sizes = [os.path.getsize(os.path.join(out, n)) for n in os.listdir(out)] if not gguf else \
        [os.path.getsize(out)]
    for k in (100, max(sizes) // 2):
        setup()
        sig = kill_after_bytes(k, new_save)
        assert sig == signal.SIGXFSZ, f"no kill after {k} bytes"
        results[f"{k} bytes"] = got = outcome(out, load_from)
        assert got == ("old" if old_shard is not None else "absent")
    save(NEW, out, new_shard)      # what a complete save over the last kill leaves
    assert outcome(out, load_from) == "new" and hidden_entries(out) == []
    return results


def test_single_to_single(tmp_path):
    r = exercise(tmp_path, SINGLE, SINGLE)
    assert list(r)[:7] == ["staged", "wrote model.safetensors", "wrote config.json",
                           "wrote generation_config.json", "before-switch", "switched", "cleaned"]
    assert [k for k in r if k.endswith(" bytes")][0] == "100 bytes" and len(r) == 9


def test_sharded_to_other_sharding(tmp_path):
    r = exercise(tmp_path, SHARDED3, SHARDED5)
    assert sum(k.startswith("wrote model-") for k in r) >= 4


def test_sharded_to_same_shard_names(tmp_path):
    exercise(tmp_path, SHARDED3, SHARDED3)


def test_sharded_to_single(tmp_path):
    exercise(tmp_path, SHARDED3, SINGLE)
    assert sorted(os.listdir(tmp_path / "ckpts" / "m")) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_single_to_sharded(tmp_path):
    exercise(tmp_path, SINGLE, SHARDED3)
    names = os.listdir(tmp_path / "ckpts" / "m")
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names


def test_new_directory(tmp_path):
    exercise(tmp_path, None, SHARDED3)


def test_gguf(tmp_path):
    r = exercise(tmp_path, SINGLE, SINGLE, gguf=True)
    assert sum(k.startswith("wrote ") for k in r) > 10


def _no_exchange():
    staging._exchange = lambda a, b: False


def test_fallback_without_rename_exchange(tmp_path):
    """Two renames: a kill between them leaves the old checkpoint under the hidden name and `out`
    absent (never a mix); the next save cleans it up."""
    r = exercise(tmp_path, SHARDED3, SINGLE, patch=_no_exchange, extra_outcomes={("set-aside", "absent")})
    assert r["set-aside"] == "absent" and r["before-switch"] == "old" and r["switched"] == "new"


def test_in_place_fallback_warns_and_removes_the_old_layout(tmp_path, monkeypatch):
    save(OLD, tmp_path / "m", SHARDED3)
    monkeypatch.setattr(staging, "_sibling_possible", lambda out: False)
    with pytest.warns(UserWarning, match="file by file"):
        save(NEW, tmp_path / "m", SINGLE)
    assert outcome(str(tmp_path / "m"), str(tmp_path / "m")) == "new"
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json", "model.safetensors"]


def test_legacy_temporaries_are_ignored_and_cleaned(tmp_path):
    """What quantload's earlier per-file saves left on a kill no longer shadows the checkpoint."""
    out = tmp_path / "m"
    save(OLD, out, SINGLE)
    (out / ".tmp-k2j3model.safetensors").write_bytes(b"partial")
    save(OLD, tmp_path / "g" / "x.gguf")
    (tmp_path / "g" / ".tmp-abcdx.gguf").write_bytes(b"partial")
    (tmp_path / "g" / ".x.gguf.quantload-tmp-999999999-abcd").write_bytes(b"partial")
    assert outcome(str(out), str(out)) == "old"
    assert outcome(str(tmp_path / "g" / "x.gguf"), str(tmp_path / "g")) == "old"
    save(NEW, out, SINGLE)
    save(NEW, tmp_path / "g" / "x.gguf")
    assert hidden_entries(str(out)) == [] and hidden_entries(str(tmp_path / "g" / "x.gguf")) == []


def test_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        save(OLD, tmp_path / "m", SHARDED3)
        save(OLD, tmp_path / "x.gguf")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o750
    for name in os.listdir(tmp_path / "m"):
        assert stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) == 0o640, name
    assert stat.S_IMODE(os.stat(tmp_path / "x.gguf").st_mode) == 0o640
    os.chmod(tmp_path / "m", 0o700)          # a re-save keeps the folder's own mode
    save(NEW, tmp_path / "m", SINGLE)
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o700


def test_symlinked_target_stays_a_link(tmp_path):
    save(OLD, tmp_path / "real", SINGLE)
    os.symlink(tmp_path / "real", tmp_path / "link")
    save(NEW, tmp_path / "link", SHARDED3)
    assert os.path.islink(tmp_path / "link")
    assert outcome(str(tmp_path / "real"), str(tmp_path / "link")) == "new"
