"""Write a model as a Hugging Face checkpoint: safetensors shards (+ index) and config.json.

QLinear modules put their scheme's encoded pieces in `state_dict()` under the exact key names the
defining tool writes (bitsandbytes' weight.absmax / quant_state..., compressed-tensors' weight_packed...),
so this writer only shards, deduplicates tied tensors and writes. The whole checkpoint (shards, index,
config.json, generation_config.json, the tokenizer's files) is staged beside the target and switched in
at once (staging.py): a crash at any point leaves the old checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..errors import ConfigError
from .staging import StagedDirectory, step, writing

DEFAULT_SHARD = 5 * 10**9


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


def save_checkpoint(model, out_dir: str, *, max_shard_size: int = DEFAULT_SHARD, tokenizer=None) -> list[str]:
    """Write model.safetensors (or shards + model.safetensors.index.json), config.json,
    generation_config.json and the tokenizer's files as one switch; returns the written paths (the
    shards, the index, config.json, then the tokenizer's files)."""
    tensors = checkpoint_tensors(model)
    shards = _shards(tensors, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written: list[str] = []
    with StagedDirectory(out_dir) as stage:
        final = stage.out

        def put(name: str, write) -> None:
            with writing(os.path.join(final, name)):
                write(os.path.join(stage.path, name))
            step(f"wrote {name}")
            written.append(os.path.join(final, name))

        for name, shard in zip(names, shards):
            put(name, lambda p, shard=shard: save_file(shard, p, metadata={"format": "pt"}))
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            body = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            put("model.safetensors.index.json", lambda p: _write_text(p, body))
        cfg = getattr(model, "config", None)
        if cfg is not None:
            put("config.json", cfg.to_json_file)
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                put("generation_config.json", gen.to_json_file)
                written.pop()   # not listed, as before
        if tokenizer is not None:
            with writing(final):
                files = tokenizer.save_pretrained(stage.path)
            written.extend(os.path.join(final, os.path.relpath(os.fspath(f), stage.path)) for f in files)
            step("wrote tokenizer")
    return written


def _write_text(path: str, body: str) -> None:
    with open(path, "w") as f:
        f.write(body)
