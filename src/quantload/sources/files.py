"""Finding a checkpoint's files and refusing what is not one (special files, git-LFS pointers), before any
source opens them. Every source kind imports this; it imports none of them."""
from __future__ import annotations

import os
import stat

from ..errors import FileFormatError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"


def require_regular_file(path: str) -> None:
    """A FIFO, socket or device named like a checkpoint file would block (or never end) on the first
    read: refused from os.stat alone, before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise FileFormatError(f"cannot read: {e}", file=path) from e
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
                "a directory" if stat.S_ISDIR(mode) else "not a regular file")
        raise FileFormatError(f"this is {kind}, not a regular file; expected a checkpoint file", file=path)


def check_not_lfs_pointer(path: str) -> None:
    """A git-LFS pointer checked out in place of the weights is the commonest 'corrupt' file."""
    require_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(LFS_MAGIC))
    except OSError as e:
        raise FileFormatError(f"cannot read: {e}", file=path) from e
    if head == LFS_MAGIC:
        raise FileFormatError("this is a git-LFS pointer file, not the weights; run `git lfs pull` "
                              "or download the real file", file=path)


def find_weight_files(path: str) -> tuple[str, list[str]]:
    """(kind, files) for a checkpoint directory or file. kind: safetensors | torch | gguf."""
    path = os.fspath(path)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            return "safetensors", [index]
        # hidden names are never weights: a save's temporaries (.x.quantload-tmp-*, older .tmp-*) and
        # editors' or rsync's partial files would otherwise join the checkpoint
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        st = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
        if st:
            return "safetensors", st
        bidx = os.path.join(path, "pytorch_model.bin.index.json")
        if os.path.exists(bidx):
            return "torch", [bidx]
        pt = [os.path.join(path, n) for n in names if n.endswith((".bin", ".pt", ".pth"))]
        if pt:
            return "torch", pt
        gg = [os.path.join(path, n) for n in names if n.endswith(".gguf")]
        if len(gg) == 1:
            return "gguf", gg
        if len(gg) > 1:
            raise FileFormatError(f"several GGUF files here ({[os.path.basename(g) for g in gg]}); "
                                  "name the one to load", file=path)
        raise FileFormatError("no weights found: expected *.safetensors, model.safetensors.index.json, "
                              "pytorch_model.bin, *.pt or *.gguf", file=path)
    if not os.path.exists(path):
        raise FileFormatError("no such file or directory", file=path)
    require_regular_file(path)
    if path.endswith(".gguf"):
        return "gguf", [path]
    if path.endswith((".safetensors", ".index.json")):
        return "safetensors", [path]
    if path.endswith((".bin", ".pt", ".pth")):
        return "torch", [path]
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf", [path]
    return "safetensors", [path]
