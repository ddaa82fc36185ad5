"""safetensors checkpoints, one file or sharded (model.safetensors.index.json), read through our own parser.

The format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data section. We check everything the safetensors library checks (and a little more) BEFORE
allocating anything, so a hostile or truncated file fails fast with an error naming file, key and offset.
Opening reads headers only; a tensor is a zero-copy view of a copy-on-write mmap, mapped on first use.
"""
from __future__ import annotations

import json
import mmap
import os

import torch

from ..errors import FileFormatError, MissingTensorError, UnsupportedError
from .files import check_not_lfs_pointer
from .base import Source, TensorInfo

#: a real header is a few MB at most; anything bigger is refused before it is read
MAX_HEADER_BYTES = 100 * 2**20

#: safetensors dtype name -> (torch dtype or None when torch has no such type, bits per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype | None, int]] = {
    "F64": (torch.float64, 64), "F32": (torch.float32, 32), "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16), "C64": (torch.complex64, 64),
    "I64": (torch.int64, 64), "I32": (torch.int32, 32), "I16": (torch.int16, 16), "I8": (torch.int8, 8),
    "U64": (getattr(torch, "uint64", None), 64), "U32": (getattr(torch, "uint32", None), 32),
    "U16": (getattr(torch, "uint16", None), 16), "U8": (torch.uint8, 8), "BOOL": (torch.bool, 8),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 8),
    "F8_E4M3FNUZ": (getattr(torch, "float8_e4m3fnuz", None), 8),
    "F8_E5M2": (getattr(torch, "float8_e5m2", None), 8),
    "F8_E5M2FNUZ": (getattr(torch, "float8_e5m2fnuz", None), 8),
    "F8_E8M0": (getattr(torch, "float8_e8m0fnu", None), 8),
    # F4 counts 4-bit elements in its shape; torch packs two per byte (last dim halved)
    "F4": (getattr(torch, "float4_e2m1fn_x2", None), 4),
    "F6_E2M3": (None, 6), "F6_E3M2": (None, 6),
}


def _refuse_duplicate_keys(pairs):
    """json object_pairs_hook: a key given twice would silently shadow the first."""
    obj = dict(pairs)  # in C; the slow search below runs only when a key repeats
    if len(obj) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return obj


def _parse_int_u64(text: str) -> int:
    """json parse_int: every number in these files fits 64 bits; longer ones cost quadratic time."""
    if len(text.lstrip("-")) > 20:
        raise ValueError(f"integer {text[:20]}... has more digits than any 64-bit number")
    return int(text)


def _parse_json(raw: bytes, file: str, offset: int | None):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys,
                          parse_int=_parse_int_u64)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileFormatError(f"not valid JSON: {e}", file=file, offset=offset) from None


def _short(x) -> str:
    """repr for messages: a hostile header can hold a megabyte-long shape or name."""
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _numel_capped(shape: list[int], cap: int) -> int:
    """numel, or cap + 1 once it exceeds cap: a hostile shape must not build huge integers."""
    if 0 in shape:
        return 0
    numel = 1
    for d in shape:
        numel *= d
        if numel > cap:
            return cap + 1
    return numel


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate one safetensors file's header against its size; return (tensor infos, __metadata__)."""
    check_not_lfs_pointer(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"file is {size} bytes, too short for the 8-byte header length "
                                  "(truncated, or not a safetensors file)", file=path, offset=0)
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise FileFormatError(f"header length {n} runs past the end of the file: expected at most "
                                  f"{size - 8} (file is {size} bytes; truncated, or not a safetensors file)",
                                  file=path, offset=0)
        if n > MAX_HEADER_BYTES:
            raise FileFormatError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit",
                                  file=path, offset=0)
        raw = f.read(n)
    if len(raw) != n:
        raise FileFormatError(f"read {len(raw)} header bytes, expected {n} (file changed while reading)",
                              file=path, offset=8)
    header = _parse_json(raw, path, 8)
    if not isinstance(header, dict):
        raise FileFormatError(f"header must be a JSON object, found {type(header).__name__}",
                              file=path, offset=8)

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # the library accepts null, so do we
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError("__metadata__ must be an object of string to string", file=path,
                              key="__metadata__")
    data_start, data_size = 8 + n, size - 8 - n
    infos = {name: _tensor_info(path, name, entry, data_start, data_size) for name, entry in header.items()}
    _check_coverage(path, infos, data_start, data_size)
    return infos, metadata


def _tensor_info(path: str, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
    def bad(msg, offset=None):
        return FileFormatError(msg, file=path, key=name, offset=offset)

    if not isinstance(entry, dict):
        raise bad(f"expected an object {{dtype, shape, data_offsets}}, found {type(entry).__name__}")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:  # a list is unhashable
        raise bad(f"unknown dtype {_short(dtype_name)}; expected one of {sorted(SAFETENSORS_DTYPES)}")
    dtype, bits = SAFETENSORS_DTYPES[dtype_name]
    # `type(x) is int` refuses bools (JSON true/false) and needs no call per element: this runs per tensor
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, found {_short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or type(offsets[0]) is not int
            or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, found {_short(offsets)}")
    begin, end = offsets
    numel = _numel_capped(shape, 8 * data_size)
    if numel > 8 * data_size:
        raise bad(f"shape {_short(shape)} needs more bytes than the whole data section ({data_size})",
                  data_start + begin)
    if numel * bits % 8:
        raise bad(f"{numel} elements of {dtype_name} ({bits} bits each) do not fill whole bytes")
    nbytes = numel * bits // 8
    if end - begin != nbytes:
        raise bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but dtype {dtype_name} "
                  f"with shape {_short(shape)} needs {nbytes}", data_start + begin)
    if end > data_size:
        raise bad(f"data_offsets end {end} runs past the end of the data section ({data_size} bytes)",
                  data_start + begin)
    if dtype is None:
        raise UnsupportedError(f"dtype {dtype_name} has no torch equivalent in torch {torch.__version__}",
                               file=path, key=name)
    if bits == 4:  # torch.float4_e2m1fn_x2 holds two elements per byte along the last dim
        if not shape or shape[-1] % 2:
            raise UnsupportedError(f"F4 tensor with shape {shape}: torch needs an even last dimension",
                                   file=path, key=name)
        shape = shape[:-1] + [shape[-1] // 2]
    return TensorInfo(name, tuple(shape), dtype, nbytes, path, data_start + begin)


def _check_coverage(path: str, infos: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """Like the safetensors library: tensors tile the data section exactly, no overlap, no hole."""
    pos, prev = 0, None
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - data_start
        if begin < pos:
            raise FileFormatError(f"data overlaps tensor {prev!r}, which ends at data offset {pos}; "
                                  f"this one begins at {begin}", file=path, key=info.name, offset=info.offset)
        if begin > pos:
            raise FileFormatError(f"hole in the data section: {begin - pos} unused bytes before this tensor "
                                  f"(expected it to begin at data offset {pos})", file=path, key=info.name,
                                  offset=info.offset)
        pos, prev = begin + info.nbytes, info.name
    if pos != data_size:
        raise FileFormatError(f"data section is {data_size} bytes but its tensors cover only {pos}",
                              file=path, offset=data_start + pos)


def read_index(path: str) -> dict[str, str]:
    """{tensor name: shard path} from a *.index.json, every shard checked to exist."""
    from .files import require_regular_file
    require_regular_file(path)
    try:
        with open(path, "rb") as f:
            # read(n) allocates n bytes up front: ask for no more than the file holds
            raw = f.read(min(os.fstat(f.fileno()).st_size, MAX_HEADER_BYTES) + 1)
    except OSError as e:
        raise FileFormatError(f"cannot read: {e}", file=path) from None
    if len(raw) > MAX_HEADER_BYTES:
        raise FileFormatError(f"index is larger than {MAX_HEADER_BYTES} bytes", file=path)
    doc = _parse_json(raw, path, None)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FileFormatError('expected a JSON object with a non-empty "weight_map": '
                              "{tensor name: shard file}", file=path)
    base, shards = os.path.dirname(path), {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in shards:  # a list or object is unhashable
            # shard names are plain file names next to the index; never let one point elsewhere
            if (not isinstance(shard, str) or not shard or os.path.isabs(shard)
                    or ".." in shard.replace("\\", "/").split("/")):
                raise FileFormatError(f"shard must be a relative file name inside the checkpoint "
                                      f"folder, found {shard!r}", file=path, key=key)
            shards[shard] = os.path.join(base, shard)
            if not os.path.isfile(shards[shard]):
                raise FileFormatError(f"the index names shard {shard!r}, which does not exist "
                                      f"(expected {shards[shard]})", file=path, key=key)
    return {key: shards[shard] for key, shard in weight_map.items()}


def split_files(files) -> tuple[str, list[str], dict[str, str] | None]:
    """(source path, data files, weight_map or None) for [index.json] or a list of data files."""
    files = [os.fspath(f) for f in files]
    if not files:
        raise FileFormatError("no checkpoint files given")
    if len(files) == 1 and files[0].endswith(".json"):
        weight_map = read_index(files[0])
        return files[0], list(dict.fromkeys(weight_map.values())), weight_map
    return (files[0] if len(files) == 1 else os.path.dirname(files[0])), files, None


def check_index_agrees(index: str, weight_map: dict[str, str], file_of: dict[str, str]) -> None:
    """Every tensor the index names must be in the shard it names."""
    for key, shard in weight_map.items():
        if file_of.get(key) != shard:
            raise FileFormatError(f"the index places this tensor in {os.path.basename(shard)!r}, "
                                  "which has no such tensor", file=index, key=key)


class SafetensorsSource(Source):
    kind = "safetensors"

    def __init__(self, files):
        self.path, shards, weight_map = split_files(files)
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for shard in shards:
            infos, metadata = read_header(shard)
            for key, info in infos.items():
                if key in self._infos:
                    raise FileFormatError(f"tensor is also in {self._infos[key].file}; each tensor must "
                                          "be in exactly one shard", file=shard, key=key)
                self._infos[key] = info
            self.metadata.update(metadata)
        if weight_map is not None:
            check_index_agrees(self.path, weight_map, {k: i.file for k, i in self._infos.items()})
        self._maps: dict[str, mmap.mmap] = {}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise MissingTensorError("no such tensor in the checkpoint", file=self.path, key=key) from None

    def get(self, key: str) -> torch.Tensor:
        info = self.info(key)
        if info.nbytes == 0:  # frombuffer refuses empty views
            return torch.empty(info.shape, dtype=info.dtype)
        # The copy-on-write map is writable, so torch has no "not writable" warning to give (filtering one
        # per tensor cost a third of this call, and warning filters are not thread-safe). Callers must not
        # write to the view all the same: they would get private pages, not a modified file.
        flat = torch.frombuffer(self._map(info.file), dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                                offset=info.offset)
        return flat.view(info.shape)

    def _map(self, file: str) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:  # the mmap keeps its own handle; the file can close now
                # copy-on-write: the model may keep zero-copy views as its weights, and a user who writes
                # to a weight in place gets private pages instead of a segfault (or a modified file)
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            last = max(i.offset + i.nbytes for i in self._infos.values() if i.file == file)
            if len(mm) < last:  # reading past the end of a map is a SIGBUS, not an exception
                raise FileFormatError(f"file is now {len(mm)} bytes, expected at least {last}: it changed "
                                      "after it was opened", file=file)
            self._maps[file] = mm
        return mm

    def release(self, key: str) -> None:
        """Drop the pages of a tensor that was consumed (quantized or copied) from this process's
        resident memory, so streaming a large checkpoint keeps RSS bounded. Views of it re-read the file."""
        info = self._infos.get(key)
        mm = self._maps.get(info.file) if info is not None else None
        if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            page = mmap.PAGESIZE
            start = -(-info.offset // page) * page
            end = (info.offset + info.nbytes) // page * page
            if end > start:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        # Dropping our references is enough, and the only safe way: tensors from get() hold the mmap
        # object alive, and mmap.close() would unmap memory they still point at. The map is unmapped when
        # the last such tensor dies.
        self._maps.clear()
