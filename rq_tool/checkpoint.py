"""A safetensors checkpoint on disk: the dtype table, validated headers, the shard index, path rules.

Used by the source side of ``rq rewrite``, by ``rq verify`` / the loader's integrity check, by
export and eval (expert bytes). Only headers are read here, never tensor data. Light on purpose
(torch + json): the runtime imports it.

Path rule: every shard an index names must be a plain relative path that stays inside the model
directory (no absolute path, no ``..``, no drive), so a model directory can never
make rq read, or load weights from, files elsewhere by name (symlinks placed in the directory are
followed, as in a Hugging Face cache snapshot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from .defaults import INDEX_FILE  # noqa: F401  (re-exported beside the reader)
from .errors import RQError
from .validate import check_dict, check_str, loads

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

# safetensors dtype name -> (torch dtype, bytes per element); the one table in rq
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {t: name for name, (t, _) in DTYPES.items()}
FLOAT_DTYPES = ("F32", "BF16", "F16")  # what rq reads as expert weights


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class FileSpan:
    """A chunk whose bytes are stored as they are in a file: ``nbytes`` at ``offset`` of ``path``;
    ``tensor`` is the same bytes (a memory-mapped view), hashed, and written where the kernel cannot
    copy file to file. The rewrite's shard writer copies a span with ``os.sendfile``: page cache to page cache, no
    copy through (or page faults on) this process's memory."""

    path: Path
    offset: int
    nbytes: int
    tensor: torch.Tensor


def inside(root: Path, name, where: str) -> Path:
    """``root / name`` for a relative ``name`` that stays inside ``root``; RQError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise RQError(f"{where}: shard name {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts or "\\" in name or ":" in pure.parts[0]:
        raise RQError(f"{where}: shard path {name!r} points outside the model directory (absolute or '..')")
    return root / pure  # symlinks are followed: a Hugging Face cache snapshot links its files to ../../blobs


def read_index(root: Path) -> dict[str, str] | None:
    """``weight_map {tensor key: shard name}`` of ``root``'s index (validated), or None without one."""
    from .validate import read

    index = root / INDEX_FILE
    if not index.is_file():
        return None
    d = read(index)
    weight_map = check_dict(d.get("weight_map") if isinstance(d, dict) else d, str(index), "weight_map")
    for key, name in weight_map.items():
        check_str(name, str(index), f"weight_map[{key[:60]!r}]")
        inside(root, name, str(index))
    return weight_map


def shard_files(root: Path) -> list[Path]:
    """The shards of a model directory: those its index lists (each checked and present), else
    every ``*.safetensors`` file in it."""
    root = Path(root)
    weight_map = read_index(root)
    if weight_map is not None:
        shards = []
        for name in sorted(set(weight_map.values())):
            path = inside(root, name, str(root / INDEX_FILE))
            if not path.is_file():
                raise RQError(f"shard {name!r} is listed in {INDEX_FILE} but missing from {root}")
            shards.append(path)
        if not shards:
            raise RQError(f"{root / INDEX_FILE}: weight_map lists no shards")
        return shards
    shards = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not shards:
        raise RQError(f"{root} has no *.safetensors weights")
    for p in shards:
        inside(root, p.name, str(root))
    return shards


def read_header(shard: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, dtype)}`` of one shard, every entry checked against the file's size."""
    return {key: (shape, dtype) for key, (shape, dtype, _) in header_entries(shard).items()}


def header_entries(shard: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """``{key: (shape, dtype, offset)}`` of one shard (``offset``: where the tensor's bytes start in
    the file), every entry checked against the file's size."""
    size = shard.stat().st_size
    try:
        with shard.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size or n > MAX_HEADER_BYTES:
                raise ValueError("header length out of range")
            raw = f.read(n)
    except (ValueError, OSError) as e:
        raise RQError(f"{shard}: corrupt or truncated safetensors file ({e})") from None
    try:
        header = loads(raw, f"{shard} header")
    except RQError as e:
        raise RQError(f"{shard}: corrupt or truncated safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise RQError(f"{shard}: corrupt safetensors header (not an object)")
    out = {}
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            shape, dtype, (start, stop) = tuple(meta["shape"]), meta["dtype"], meta["data_offsets"]
            ok = (dtype in DTYPES and all(type(s) is int and s >= 0 for s in shape)
                  and type(start) is int and type(stop) is int and 0 <= start <= stop
                  and stop - start == math.prod(shape) * DTYPES[dtype][1])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise RQError(f"{shard}: corrupt safetensors header entry {key[:80]!r}")
        end = max(end, stop)
        out[key] = (shape, dtype, 8 + n + start)
    if 8 + n + end > size:
        raise RQError(f"{shard}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return out


class SafetensorsCheckpoint:
    """All tensors of a model directory: ``key -> TensorInfo``, in shard order, headers checked;
    ``offsets``: key -> where its bytes start in its shard file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shards = shard_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self.offsets: dict[str, int] = {}
        for shard in self.shards:
            for key, (shape, dtype, offset) in header_entries(shard).items():
                if key in self.tensors:
                    raise RQError(f"{shard.name}: tensor {key!r} also appears in {self.tensors[key].shard.name}")
                self.tensors[key] = TensorInfo(shard, shape, dtype)
                self.offsets[key] = offset

    def keys_by_shard(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {s: [] for s in self.shards}
        for key, info in self.tensors.items():
            out[info.shard].append(key)
        return out
