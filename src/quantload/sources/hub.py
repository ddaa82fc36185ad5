"""Hugging Face Hub ids ("HuggingFaceTB/SmolLM2-135M-Instruct") as load paths, through huggingface_hub.

A path that exists locally is used as it is. Otherwise an "owner/name" id is resolved to a folder (or a
.gguf file) in huggingface_hub's cache: offline (HF_HUB_OFFLINE=1, read at each call, or the Hub
unreachable) the cached snapshot is used; online only the files a load reads are downloaded (config,
weights of one format, tokenizer files), with huggingface_hub's own progress bars. `revision=` picks a
branch, tag or commit; `filename=` picks one file of a repository (a GGUF among several quantizations).
"""
from __future__ import annotations

import os
import re

from ..errors import ConfigError, QuantloadError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

#: small files a load, load_tokenizer or save next to it may read
CONFIG_FILES = ("config.json", "generation_config.json", "quantize_config.json", "quant_config.json",
                "quanto_qmap.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json", "preprocessor_config.json")


def is_repo_id(path: str) -> bool:
    """Whether `path` names a Hub repository rather than a local file (which must then not exist)."""
    return not os.path.exists(path) and bool(_REPO_ID.match(path)) and not path.endswith((".gguf", ".safetensors"))


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None


def files_needed(names: list[str], filename: str | None = None, *, repo: str = "") -> list[str]:
    """Of a repository's files, the ones a load reads: one weight format (safetensors, else .bin, else a
    single .gguf) at the top level, plus config and tokenizer files."""
    if filename is not None:
        if filename not in names:
            raise QuantloadError(f"no file {filename!r} in this repository; it has: {sorted(names)[:20]}",
                                 file=repo)
        return [filename] + ([n for n in names if n in CONFIG_FILES] if not filename.endswith(".gguf") else [])
    top = [n for n in names if "/" not in n]
    safetensors = [n for n in top if n.endswith((".safetensors", ".safetensors.index.json"))]
    bins = [n for n in top if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json"))]
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    weights = safetensors or bins
    if not weights:
        if len(ggufs) == 1:
            return ggufs
        if ggufs:
            raise ConfigError(f"this repository holds {len(ggufs)} GGUF files; pass filename= to pick one of "
                              f"{ggufs}", file=repo)
        raise QuantloadError("no weights quantload reads in this repository (no .safetensors, "
                             f"pytorch_model*.bin or .gguf); it has: {sorted(names)[:20]}", file=repo)
    return weights + [n for n in top if n in CONFIG_FILES]


def _in_folder(folder: str, repo: str) -> str:
    """A cached snapshot folder as a load path: the folder, or its one .gguf when it holds nothing else."""
    names = [os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs]
    try:
        wanted = files_needed(names, repo=repo)
    except ConfigError:
        raise
    except QuantloadError:
        return folder
    if len(wanted) == 1 and wanted[0].endswith(".gguf"):
        return os.path.join(folder, wanted[0])
    return folder


def resolve(path, *, revision: str | None = None, filename: str | None = None) -> str:
    """A local path for `path`: itself when it exists (joined with `filename` when given for a folder),
    else the local copy of the Hub repository it names."""
    path = os.fspath(path)
    if not is_repo_id(path):
        if filename is not None and os.path.isdir(path):
            return os.path.join(path, filename)
        return path
    try:
        import huggingface_hub as hf
    except ImportError:
        raise QuantloadError(f"{path!r} is not a local path, and looks like a Hub id, but huggingface_hub is not "
                             "installed (pip install huggingface_hub)") from None
    from huggingface_hub import errors as hf_errors
    cache = _cache_dir()
    kw = dict(revision=revision, cache_dir=cache)
    where = cache or hf.constants.HF_HUB_CACHE
    reason = "it is not cached"
    try:
        if not _offline():
            try:
                names = hf.HfApi().list_repo_files(path, revision=revision)
            except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
                raise
            except Exception as e:  # the Hub cannot be reached: the cache decides, as huggingface_hub does
                reason = f"the Hub could not be reached ({type(e).__name__}: {e})"
            else:
                wanted = files_needed(names, filename, repo=path)
                if len(wanted) == 1 and wanted[0].endswith(".gguf"):
                    return hf.hf_hub_download(path, wanted[0], **kw)
                folder = hf.snapshot_download(path, allow_patterns=wanted, **kw)
                return os.path.join(folder, filename) if filename is not None else folder
        else:
            reason = "downloads are off (HF_HUB_OFFLINE=1)"
        if filename is not None:
            return hf.hf_hub_download(path, filename, local_files_only=True, **kw)
        folder = hf.snapshot_download(path, local_files_only=True, **kw)
        return _in_folder(folder, path)
    except hf_errors.LocalEntryNotFoundError:
        what = f"{path}" + (f" at revision {revision!r}" if revision else "") + (f", file {filename!r}" if filename else "")
        raise QuantloadError(f"{what!r} is not a local path and is not in the Hugging Face cache ({where}); "
                             f"{reason}. Download it once online (or `hf download {path}`), or give a local "
                             "path") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise QuantloadError(f"the Hub has no such repository or revision: {e}", file=path) from None
