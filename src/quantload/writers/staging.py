"""Crash-safe saves: a whole checkpoint is written beside the old one and switched in with one rename.

A checkpoint directory is several files (shards, index, config.json, tokenizer...) that a loader reads
together, so replacing them one by one lets a kill leave a mix of two saves. Instead:

1. the new checkpoint is written complete into a hidden sibling `.<name>.quantload-tmp-<pid>-<rand>`
   (same parent, so same filesystem);
2. files of the old directory that are not part of a checkpoint's layout (README, a .gguf, tokenizer
   files the new save does not write...) are hard-linked into it, so nothing of the user's is lost;
3. one `renameat2(RENAME_EXCHANGE)` swaps the two directories atomically: before it `out` is the old
   checkpoint, after it the new one; any kill leaves one of the two, never a mix;
4. the old checkpoint, now under the hidden name, is removed.

A kill leaves at most a hidden `*.quantload-tmp-<pid>-*` entry: loaders skip names starting with "." and
the next save into the same place removes those whose process is gone. Files get the modes the user's
umask gives (a plain open), the directory keeps the old one's mode.

Where the exchange cannot work (no renameat2 on this OS or filesystem) the switch is two renames (old
aside, new in): a kill between them leaves the old checkpoint under the hidden name, `out` missing, and
never a mix. Where no sibling can be made (the parent is read-only, or `out` is a mount point) the files
are staged inside `out` and moved in one by one, index or single file last, with a warning that this
fallback is atomic per file only.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator

from ..errors import QuantloadError, WriteError

TMP_TAG = ".quantload-tmp-"
#: files a loader reads as a checkpoint's weights or its config: never carried over from the old one
_LAYOUT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
_LAYOUT_NAMES = {"config.json", "generation_config.json", "quantize_config.json", "quant_config.json",
                 "quanto_qmap.json"}

#: tests set this to a function of the step name (it may SIGKILL the process there); see _step
crash_hook: Callable[[str], None] | None = None


def step(name: str) -> None:
    """A named point of a save where a crash test can kill the process deterministically."""
    if crash_hook is not None:
        crash_hook(name)


def temp_name(base: str) -> str:
    """A hidden name no loader picks up (no weight suffix, leading dot) that says whose it is."""
    return f".{base}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover(name: str, base: str | None) -> bool:
    """A temporary of an interrupted save (ours: its process is gone; or the old `.tmp-*` names)."""
    if name.startswith(".tmp-") and name.endswith((".safetensors", ".json", ".gguf")):
        return True       # mkstemp names of quantload before 0.2; their process is unknown
    if not name.startswith(".") or TMP_TAG not in name:
        return False
    owner, _, rest = name.rpartition(TMP_TAG)
    if base is not None and owner != f".{base}":
        return False
    pid = rest.split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def remove_leftovers(directory: str, base: str | None = None) -> None:
    """Delete temporaries that interrupted saves left in `directory` (only those of `base` if given)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if _leftover(name, base):
            _remove(os.path.join(directory, name))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OS or safetensors write failure into a WriteError naming the file."""
    try:
        yield
    except QuantloadError:
        raise
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on the device"
        raise WriteError(f"cannot write: {reason} (errno {e.errno})", file=path) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise WriteError(f"cannot write: {e}", file=path) from e


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make renames in `path` durable (power loss, not just a kill); a no-op where dirs can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def is_layout_file(name: str) -> bool:
    return name in _LAYOUT_NAMES or name.endswith(_LAYOUT_SUFFIXES)


def _carry_over(old: str, new: str) -> None:
    """Hard-link (copy where links fail) what the old directory holds besides a checkpoint."""
    for name in os.listdir(old):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if name.startswith(".") and (TMP_TAG in name or name.startswith(".tmp-")):
            continue
        if os.path.lexists(dst) or is_layout_file(name):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
            shutil.copystat(src, dst)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def target_directory(out: str) -> str:
    """The real directory a checkpoint goes to (a symlink is followed, so the link stays a link)."""
    out = os.path.abspath(os.fspath(out))
    if os.path.islink(out):
        out = os.path.realpath(out)
    with writing(out):
        if os.path.lexists(out) and not os.path.isdir(out):
            raise WriteError("exists and is not a directory: a checkpoint is written as a directory "
                             "(give a new path, or one ending in .gguf for a single file)", file=out)
        make_parent(out)
    return out


def make_parent(out: str) -> None:
    """Create the folders above `out`, refusing clearly where one of them is a file."""
    parent = os.path.dirname(os.path.abspath(out))
    with writing(out):
        for p in _ancestors(parent):
            if os.path.lexists(p) and not os.path.isdir(p):
                raise WriteError(f"{p} is a file, not a directory, so nothing can be written below it",
                                 file=out)
        os.makedirs(parent, exist_ok=True)


def _ancestors(path: str) -> list[str]:
    out = []
    while True:
        out.append(path)
        up = os.path.dirname(path)
        if up == path:
            return out[::-1]
        path = up


def _sibling_possible(out: str) -> bool:
    parent = os.path.dirname(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        return False
    if not os.path.isdir(out):
        return True
    return not os.path.ismount(out) and os.stat(out).st_dev == os.stat(parent).st_dev


class StagedDirectory:
    """`with StagedDirectory(out) as stage:` write files under `stage.path`; leaving the block without
    an exception switches them in (see the module docstring), with one removes the staged copy."""

    def __init__(self, out: str):
        self.out = target_directory(out)
        self.parent, self.base = os.path.dirname(self.out), os.path.basename(self.out)
        self.in_place = not _sibling_possible(self.out)
        self.path = ""
        self.file_mode = 0o644

    def __enter__(self) -> StagedDirectory:
        remove_leftovers(self.parent, self.base)
        if os.path.isdir(self.out):
            remove_leftovers(self.out)
        mode = stat.S_IMODE(os.stat(self.out).st_mode) if os.path.isdir(self.out) else 0o777
        if self.in_place:
            with writing(self.out):
                os.makedirs(self.out, exist_ok=True)
            where, name = self.out, temp_name("")
        else:
            where, name = self.parent, temp_name(self.base)
        self.path = os.path.join(where, name)
        with writing(self.out):
            os.mkdir(self.path, 0o777)         # the umask applies, as it does for a plain mkdir
            # files get what a plain open gives under this umask (safetensors itself creates 0600)
            self.file_mode = stat.S_IMODE(os.stat(self.path).st_mode) & 0o666
            if mode != 0o777:
                os.chmod(self.path, mode)      # the old directory's own mode, exactly
        step("staged")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            _remove(self.path)
            return
        try:
            with writing(self.out):
                for name in os.listdir(self.path):
                    file = os.path.join(self.path, name)
                    if os.path.isfile(file) and not os.path.islink(file):
                        os.chmod(file, self.file_mode)
                        fsync_file(file)
                if self.in_place:
                    self._move_in_place()
                else:
                    self._switch()
        except BaseException:
            if self.path and os.path.exists(self.path):
                _remove(self.path)
            raise

    def _switch(self) -> None:
        if not os.path.isdir(self.out):
            fsync_dir(self.path)
            step("before-switch")
            os.rename(self.path, self.out)     # nothing was there: appearing complete is the switch
            fsync_dir(self.parent)
            step("switched")
            return
        _carry_over(self.out, self.path)
        fsync_dir(self.path)
        step("before-switch")
        if _exchange(self.path, self.out):
            fsync_dir(self.parent)
            step("switched")               # self.path now holds the old checkpoint
            _remove(self.path)
        else:
            aside = os.path.join(self.parent, temp_name(self.base))
            os.rename(self.out, aside)
            step("set-aside")
            try:
                os.rename(self.path, self.out)
            except BaseException:
                os.rename(aside, self.out)
                raise
            fsync_dir(self.parent)
            step("switched")
            _remove(aside)
        step("cleaned")

    def _move_in_place(self) -> None:
        warnings.warn(f"{self.out}: no folder could be made beside it (read-only parent or a mount point), "
                      "so the checkpoint was replaced file by file: a crash during this save could have "
                      "left a mix of the old and the new files", stacklevel=4)
        names = os.listdir(self.path)
        commit = [n for n in ("model.safetensors.index.json", "model.safetensors") if n in names]
        order = [n for n in names if n not in commit and n not in _LAYOUT_NAMES]
        order += [n for n in names if n in _LAYOUT_NAMES] + commit
        for name in order:
            os.replace(os.path.join(self.path, name), os.path.join(self.out, name))
        for name in os.listdir(self.out):     # the previous layout's files that the new one lacks
            if is_layout_file(name) and name not in names:
                os.unlink(os.path.join(self.out, name))
        fsync_dir(self.out)
        os.rmdir(self.path)
