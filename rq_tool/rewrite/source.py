"""Reading a source checkpoint: safetensors shards only, validated before anything is written.

The header reader lives in ``rq_tool.checkpoint`` (shared with the runtime's integrity check).
A source checkpoint has *stored* tensors (what the safetensors headers list) and *logical* ones
(what the same model's unquantized checkpoint would hold): equal for fp32/bf16/fp16 checkpoints;
for FP8 and MXFP4 releases a logical tensor is read from a weight and its scales
(``rq_tool.quant.sources``), possibly in different shards, and dequantized on read.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import INDEX_FILE, SafetensorsCheckpoint, TensorInfo
from ..errors import RQError
from ..quant.sources import SourceQuant, StoredTensor, read_source_quant

__all__ = ["INDEX_FILE", "CheckpointReader", "LogicalTensor", "SourceCheckpoint", "TensorInfo"]


@dataclass(frozen=True)
class LogicalTensor(TensorInfo):
    """A logical tensor: ``shard`` of its primary stored part, ``shape`` / ``dtype`` as handed out
    (dequantized), ``stored`` the parts it is read from, ``stored_bytes`` their bytes on disk."""

    stored: StoredTensor | None = None
    stored_bytes: int = 0


class SourceCheckpoint(SafetensorsCheckpoint):
    """A source model directory's tensors, headers checked, in shard order.

    ``stored``: stored key -> TensorInfo (the safetensors headers). ``tensors``: logical key ->
    LogicalTensor (``.stored`` names the parts). ``quant``: the checkpoint's source quantization
    (from its config.json by default).
    """

    def __init__(self, path: Path, quant: SourceQuant | None = None):
        super().__init__(path)
        if quant is None:
            from ..modelio import read_config_dict

            cfg = self.path / "config.json"
            quant = read_source_quant(read_config_dict(self.path)) if cfg.is_file() else SourceQuant(None)
        self.quant = quant
        self.stored: dict[str, TensorInfo] = self.tensors
        logical = quant.logical({k: (i.shape, i.dtype) for k, i in self.stored.items()})
        self.tensors = {  # type: ignore[assignment]
            key: LogicalTensor(self.stored[st.primary].shard, st.shape, st.dtype, st,
                               sum(self.stored[k].nbytes for k in st.parts.values()))
            for key, st in logical.items()}
        self._part_of = {k: key for key, st in logical.items() for k in st.parts.values()}

    def logical_key(self, stored_key: str) -> str | None:
        """The logical tensor a stored tensor belongs to (None: not part of one, e.g. activation scales)."""
        return self._part_of.get(stored_key)

    def keys_by_shard(self) -> dict[Path, list[str]]:
        """Stored keys of every shard, in file order of the index / headers."""
        out: dict[Path, list[str]] = {s: [] for s in self.shards}
        for key, info in self.stored.items():
            out[info.shard].append(key)
        return out

    def reader(self) -> "CheckpointReader":
        return CheckpointReader(self)


class CheckpointReader:
    """Open shards (memory-mapped, opened once each) of a checkpoint; a context manager.

    ``stored(key)`` is the stored tensor as is (zero-copy over the mapped file); ``logical(key)``
    the logical tensor, dequantized from its parts when the checkpoint is quantized.
    """

    def __init__(self, ckpt: SourceCheckpoint):
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
            except Exception as e:  # safetensors errors on a damaged shard
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
            raise RQError(f"{shard}: cannot read tensors ({type(e).__name__}: {e})") from None

    def logical(self, key: str) -> torch.Tensor:
        st = self.ckpt.tensors[key].stored
        parts = {role: self.stored(k) for role, k in st.parts.items()}
        return self.ckpt.quant.dequantize(st, parts)
