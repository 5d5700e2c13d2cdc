"""Reading a source checkpoint: safetensors shards only, validated before anything is written."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import defaults
from ..errors import RQError


@dataclass(frozen=True)
class TensorInfo:
    shard: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"


class SafetensorsCheckpoint:
    """All tensors of a model directory: ``key -> TensorInfo``, in shard order, headers checked."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shards = self._find_shards()
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for key, (shape, dtype) in self._read_header(shard).items():
                if key in self.tensors:
                    raise RQError(f"{shard.name}: tensor {key!r} also appears in {self.tensors[key].shard.name}")
                self.tensors[key] = TensorInfo(shard, shape, dtype)

    def _find_shards(self) -> list[Path]:
        index = self.path / defaults.INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise RQError(f"{index}: malformed index ({type(e).__name__})") from None
            shards = sorted(set(weight_map.values()))
            for name in shards:
                if not (self.path / name).is_file():
                    raise RQError(f"shard {name!r} is listed in {defaults.INDEX_FILE} but missing from {self.path}")
            return [self.path / n for n in shards]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise RQError(f"{self.path} has no *.safetensors weights")
        return shards

    @staticmethod
    def _read_header(shard: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        """Parse and check a shard's header without reading tensor data (size checked too)."""
        size = shard.stat().st_size
        try:
            with shard.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise RQError(f"{shard}: corrupt or truncated safetensors file ({e})") from None
        out = {}
        end = 0
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            try:
                shape, dtype, (_, stop) = tuple(meta["shape"]), meta["dtype"], meta["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise RQError(f"{shard}: corrupt safetensors header entry {key!r}") from None
            end = max(end, stop)
            out[key] = (shape, dtype)
        if 8 + n + end > size:
            raise RQError(f"{shard}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
        return out

    def keys_by_shard(self) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {s: [] for s in self.shards}
        for key, info in self.tensors.items():
            out[info.shard].append(key)
        return out
