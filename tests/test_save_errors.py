"""A save that cannot be written raises WriteError (a QuantloadError) naming the file, and leaves the
previous checkpoint as it was, with no temporary behind: a parent that is a file, a file where a
directory is expected (and the reverse for GGUF), /proc, a full disk (a tiny tmpfs where this process
may mount one, and an ENOSPC injected into the writes everywhere)."""
from __future__ import annotations

import errno
import io
import gc
import os
import subprocess

import pytest
import torch
import transformers

import quantload
from quantload.errors import QuantloadError, WriteError
from quantload.writers import gguf_writer, safetensors_writer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def save(model, out):
    return quantload.save(model, out, quantize="f32") if str(out).endswith(".gguf") else quantload.save(model, out)


def snapshot(d) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("name", ["ckpt", "x.gguf"])
def test_parent_is_a_file(model, tmp_path, name):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WriteError, match="is a file, not a directory") as e:
        save(model, tmp_path / "file.txt" / "sub" / name)
    assert e.value.file == str(tmp_path / "file.txt" / "sub" / name)
    assert snapshot(tmp_path) == {"file.txt": b"x"}


def test_existing_file_where_a_directory_is_expected(model, tmp_path):
    (tmp_path / "ckpt").write_text("mine")
    with pytest.raises(WriteError, match="exists and is not a directory") as e:
        save(model, tmp_path / "ckpt")
    assert e.value.file == str(tmp_path / "ckpt") and snapshot(tmp_path) == {"ckpt": b"mine"}


def test_existing_directory_where_a_gguf_file_is_expected(model, tmp_path):
    (tmp_path / "x.gguf").mkdir()
    with pytest.raises(WriteError, match="is a directory") as e:
        save(model, tmp_path / "x.gguf")
    assert e.value.file == str(tmp_path / "x.gguf") and os.listdir(tmp_path) == ["x.gguf"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no procfs")
@pytest.mark.parametrize("name", ["/proc/quantload-ckpt", "/proc/quantload.gguf", "/proc/self/quantload"])
def test_into_proc(model, name):
    with pytest.raises(WriteError, match="cannot write") as e:
        save(model, name)
    assert e.value.file == name and e.value.__cause__ is not None


class _FullDisk(io.RawIOBase):
    """A file whose writes fail with ENOSPC once `room` bytes are in."""

    def __init__(self, fd, room):
        self.fd, self.room = fd, room

    def writable(self):
        return True

    def write(self, b):
        n = len(memoryview(b))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return os.write(self.fd, b)

    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()


def test_full_disk_injected_safetensors(model, tmp_path, monkeypatch):
    save(model, tmp_path / "ckpt")
    before = snapshot(tmp_path / "ckpt")
    from safetensors import SafetensorError

    def fail(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors_writer, "save_file", fail)
    with pytest.raises(WriteError, match="No space left on device") as e:
        save(model, tmp_path / "ckpt")
    assert e.value.file == str(tmp_path / "ckpt" / "model.safetensors")
    monkeypatch.undo()

    def no_room_for_config(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(type(model.config), "to_json_file", lambda self, path, *a, **k: no_room_for_config(path))
    with pytest.raises(WriteError, match="no space left on the device") as e:
        save(model, tmp_path / "ckpt")
    assert e.value.file == str(tmp_path / "ckpt" / "config.json")
    assert snapshot(tmp_path / "ckpt") == before and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_full_disk_injected_gguf(model, tmp_path, monkeypatch):
    save(model, tmp_path / "x.gguf")
    before = snapshot(tmp_path)
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k:
                        io.BufferedWriter(_FullDisk(fd, 5000)) if "w" in mode else real(fd, mode, *a, **k))
    with pytest.raises(WriteError, match="no space left on the device") as e:
        gguf_writer.save_gguf(model, tmp_path / "x.gguf", quantize="f32")
    monkeypatch.undo()
    assert e.value.file == str(tmp_path / "x.gguf") and snapshot(tmp_path) == before


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 240 KiB tmpfs: room for one checkpoint of the model, not for a second one beside it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    gc.collect()  # a model loaded from the tmpfs may still hold maps of its files
    subprocess.run(["umount", "-l", str(mnt)], check=True)  # lazy: detached now, freed when the last map goes


def test_full_disk_tmpfs(model, tiny_tmpfs):
    save(model, tiny_tmpfs / "ckpt")
    save(model, tiny_tmpfs / "x.gguf")  # ~100 KiB each: no room for a third copy
    before = {"ckpt": snapshot(tiny_tmpfs / "ckpt"), "gguf": open(tiny_tmpfs / "x.gguf", "rb").read()}
    for out in ("ckpt", "x.gguf"):
        with pytest.raises(QuantloadError) as e:
            save(model, tiny_tmpfs / out)
        assert isinstance(e.value, WriteError) and e.value.file.startswith(str(tiny_tmpfs / out)), str(e.value)
        assert "space" in str(e.value).lower(), str(e.value)
    assert sorted(os.listdir(tiny_tmpfs)) == ["ckpt", "x.gguf"]
    assert snapshot(tiny_tmpfs / "ckpt") == before["ckpt"]
    assert open(tiny_tmpfs / "x.gguf", "rb").read() == before["gguf"]
    quantload.load(tiny_tmpfs / "ckpt", progress=False)
