"""Write a model as a Hugging Face checkpoint: safetensors shards (+ index) and config.json.

QLinear modules put their scheme's encoded pieces in `state_dict()` under the exact key names the
defining tool writes (bitsandbytes' weight.absmax / quant_state..., compressed-tensors' weight_packed...),
so this writer only shards, deduplicates tied tensors and writes atomically.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import save_file

from ..errors import ConfigError

DEFAULT_SHARD = 5 * 10**9


def _atomic_write(final: str, write) -> None:
    """Write through a temporary file in the same directory, then rename over the target."""
    d = os.path.dirname(os.path.abspath(final))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(final), dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The state dict as it goes on disk: CPU, contiguous, tied duplicates removed (first name wins)."""
    from ..finalize import tied_pairs
    sd = model.state_dict()
    tied_targets = {t for t, _ in tied_pairs(model)}
    out, seen = {}, {}
    for k, t in sd.items():
        if t.is_meta:
            raise ConfigError(f"cannot save: {k} is still on the meta device")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen and k in tied_targets:
            continue
        if key is not None:
            seen.setdefault(key, k)
        out[k] = t.detach().to("cpu").contiguous()
        if key is not None and seen[key] != k:
            out[k] = out[k].clone()  # an untied alias: safetensors refuses shared storage
    return out


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def save_checkpoint(model, out_dir: str, *, max_shard_size: int = DEFAULT_SHARD) -> list[str]:
    """Write model.safetensors (or shards + model.safetensors.index.json) and config.json."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = checkpoint_tensors(model)
    shards = _shards(tensors, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written = []
    for name, shard in zip(names, shards):
        path = os.path.join(out_dir, name)
        _atomic_write(path, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        written.append(path)
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        _atomic_write(index, lambda tmp: open(tmp, "w").write(body))
        written.append(index)
    elif os.path.exists(index):
        os.unlink(index)  # a stale index from an earlier sharded save would shadow the new file
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg_path = os.path.join(out_dir, "config.json")
        _atomic_write(cfg_path, lambda tmp: cfg.to_json_file(tmp))
        written.append(cfg_path)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gpath = os.path.join(out_dir, "generation_config.json")
            _atomic_write(gpath, lambda tmp: gen.to_json_file(tmp))
    return written
