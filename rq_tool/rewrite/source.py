"""Reading a source checkpoint: safetensors shards only, validated before anything is written.

A checkpoint has *stored* tensors (what the safetensors headers list) and *logical* ones (what the
same model's unquantized checkpoint would hold): equal for fp32/bf16/fp16 checkpoints; for FP8 and
MXFP4 releases a logical tensor is read from a weight and its scales (``rq_tool.quant.sources``),
possibly in different shards, and dequantized on read.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import RQError
from ..quant.sources import SourceQuant, StoredTensor, read_source_quant

INDEX_FILE = "model.safetensors.index.json"


# safetensors dtype name -> torch dtype (every dtype rq reads or writes)
ST_TO_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
               "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
if hasattr(torch, "float8_e8m0fnu"):  # E8M0 block scales (MXFP8 / ue8m0 FP8 releases)
    ST_TO_TORCH["F8_E8M0"] = torch.float8_e8m0fnu


@dataclass(frozen=True)
class TensorInfo:
    shard: Path  # the shard of the tensor (logical tensors: of their primary stored part)
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16" (logical tensors: as handed out, dequantized)
    stored: StoredTensor | None = None  # logical tensors: the stored parts they are read from
    stored_bytes: int = 0  # bytes of the stored part(s) on disk


class SafetensorsCheckpoint:
    """All tensors of a model directory, headers checked, in shard order.

    ``stored``: stored key -> TensorInfo. ``tensors``: logical key -> TensorInfo (``.stored`` names
    the parts). ``quant``: the checkpoint's source quantization (from its config.json by default).
    """

    def __init__(self, path: Path, quant: SourceQuant | None = None):
        self.path = Path(path)
        if quant is None:
            cfg = self.path / "config.json"
            quant = read_source_quant(json.loads(cfg.read_text())) if cfg.is_file() else SourceQuant(None)
        self.quant = quant
        self.shards = self._find_shards()
        self.stored: dict[str, TensorInfo] = {}
        for shard in self.shards:
            for key, (shape, dtype) in self._read_header(shard).items():
                if key in self.stored:
                    raise RQError(f"{shard.name}: tensor {key!r} also appears in {self.stored[key].shard.name}")
                self.stored[key] = TensorInfo(shard, shape, dtype, None, _nbytes(shape, dtype))
        logical = quant.logical({k: (i.shape, i.dtype) for k, i in self.stored.items()})
        self.tensors: dict[str, TensorInfo] = {
            key: TensorInfo(self.stored[st.primary].shard, st.shape, st.dtype, st,
                            sum(self.stored[k].stored_bytes for k in st.parts.values()))
            for key, st in logical.items()}
        self._part_of = {k: key for key, st in logical.items() for k in st.parts.values()}

    def logical_key(self, stored_key: str) -> str | None:
        """The logical tensor a stored tensor belongs to (None: not part of one, e.g. activation scales)."""
        return self._part_of.get(stored_key)

    def _find_shards(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise RQError(f"{index}: malformed index ({type(e).__name__})") from None
            shards = sorted(set(weight_map.values()))
            for name in shards:
                if not (self.path / name).is_file():
                    raise RQError(f"shard {name!r} is listed in {INDEX_FILE} but missing from {self.path}")
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
        """Stored keys of every shard, in file order of the index / headers."""
        out: dict[Path, list[str]] = {s: [] for s in self.shards}
        for key, info in self.stored.items():
            out[info.shard].append(key)
        return out

    def reader(self) -> "CheckpointReader":
        return CheckpointReader(self)


def _nbytes(shape, dtype: str) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * (ST_TO_TORCH[dtype].itemsize if dtype in ST_TO_TORCH else 1)


class CheckpointReader:
    """Open shards (memory-mapped, opened once each) of a checkpoint; a context manager.

    ``stored(key)`` is the stored tensor as is (zero-copy over the mapped file); ``logical(key)``
    the logical tensor, dequantized from its parts when the checkpoint is quantized.
    """

    def __init__(self, ckpt: SafetensorsCheckpoint):
        self.ckpt = ckpt
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._open.clear()

    def _file(self, shard: Path):
        f = self._open.get(shard)
        if f is None:
            try:
                f = self._stack.enter_context(safe_open(str(shard), framework="pt"))
            except Exception as e:
                raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None
            self._open[shard] = f
        return f

    def stored(self, key: str) -> torch.Tensor:
        shard = self.ckpt.stored[key].shard
        try:
            return self._file(shard).get_tensor(key)
        except RQError:
            raise
        except Exception as e:  # safetensors errors on a damaged shard
            raise RQError(f"{shard}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None

    def logical(self, key: str) -> torch.Tensor:
        st = self.ckpt.tensors[key].stored
        parts = {role: self.stored(k) for role, k in st.parts.items()}
        return self.ckpt.quant.dequantize(st, parts)
