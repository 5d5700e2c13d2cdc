"""Output side of the streaming rewrite: streamed safetensors shards, index, manifest, atomic publish."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .. import __version__, defaults
from ..errors import RQError

INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
              torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
if hasattr(torch, "float8_e8m0fnu"):  # E8M0 block scales (MXFP8 / ue8m0 FP8 releases)
    _ST_DTYPES[torch.float8_e8m0fnu] = "F8_E8M0"
_METADATA = '"__metadata__":{"format":"pt"}'


class ShardWriter:
    """Streams tensors into safetensors shards of at most ``max_bytes`` of tensor data each.

    A tensor is written to disk as soon as it is added, so memory holds one tensor, not one shard
    (``safetensors.save_file`` would hold the shard twice: the tensors and their serialized bytes).
    The JSON header is known only at the end, so each shard starts with ``header_bytes`` reserved
    for it and the header is padded there with spaces, as the safetensors format allows. A shard is
    closed early when the next entry would not fit the header or would start misaligned for its
    dtype (the data section starts 8-byte aligned, as in safetensors' own files).
    """

    def __init__(self, directory: Path, max_bytes: int = defaults.SHARD_BYTES, header_bytes: int | None = None):
        self.dir = directory
        self.max_bytes = max_bytes
        # ~130 bytes per entry: 4 KiB (tiny shards) .. 1 MiB (2 GiB shards, ~8000 tensors); a multiple of 8
        self.header_bytes = header_bytes or min(1 << 20, max(4096, max_bytes // 2048 * 8))
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._file = None
        self._entries: list[str] = []
        self._keys: list[str] = []
        self._offset = 0
        self._header_len = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise RQError(f"cannot store tensor {key!r} of dtype {t.dtype} in safetensors")
        nbytes = t.numel() * t.element_size()
        if self._file is not None:
            entry = self._entry(key, t, nbytes)
            if (self._offset + nbytes > self.max_bytes or self._offset % t.element_size()
                    or self._header_len + len(entry) + 1 > self.header_bytes):
                self.flush()
        if self._file is None:
            part = self.dir / f".part-{len(self.parts):05d}.safetensors"
            self._file = part.open("wb")
            self._file.seek(8 + self.header_bytes)
            self.parts.append((part, self._keys))
            self._header_len = len(_METADATA) + 2
        entry = self._entry(key, t, nbytes)
        if self._header_len + len(entry) + 1 > self.header_bytes:
            raise RQError(f"tensor name {key[:80]!r}... is too long for a {self.header_bytes}-byte safetensors header")
        if nbytes:
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._entries.append(entry)
        self._keys.append(key)
        self._header_len += len(entry) + 1
        self._offset += nbytes
        self.total_bytes += nbytes

    def _entry(self, key: str, t: torch.Tensor, nbytes: int) -> str:
        meta = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                "data_offsets": [self._offset, self._offset + nbytes]}
        return f"{json.dumps(key)}:{json.dumps(meta, separators=(',', ':'))}"

    def flush(self) -> None:
        """Write the current shard's header and close it."""
        if self._file is None:
            return
        header = ("{" + ",".join([_METADATA, *self._entries]) + "}").encode()
        assert len(header) <= self.header_bytes, (len(header), self.header_bytes)
        self._file.seek(0)
        self._file.write(self.header_bytes.to_bytes(8, "little") + header.ljust(self.header_bytes, b" "))
        self._file.close()
        self._file, self._entries, self._keys, self._offset = None, [], [], 0

    def finish(self) -> dict[str, str]:
        """Name the shards ``model-0000i-of-0000n.safetensors``, write the index; returns weight_map."""
        self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, (part, keys) in enumerate(self.parts, 1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes, "format": defaults.SLOT_FORMAT[0],
                              "version": defaults.SLOT_FORMAT[1]}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.dir / INDEX_FILE, index)
        return weight_map


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict:
    """sha256 and size of every file in ``directory`` (the manifest itself excluded)."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != defaults.MANIFEST_FILE:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": defaults.MANIFEST_FORMAT[0], "version": defaults.MANIFEST_FORMAT[1],
                "rq_version": __version__, "files": files}
    write_json(directory / defaults.MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------- atomic publish
_TMP_TAG = ".rq-tmp-"


def temp_dir_for(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` (same filesystem, so the final rename is atomic)."""
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise RQError(f"cannot create the output beside {out} ({e.strerror or e}{where})") from None
    return tmp


def clean_stale_temporaries(out: Path) -> list[str]:
    """Tidy up after earlier rewrites of ``out`` whose process is gone (killed, crashed, power loss).

    Their temporary directories are removed. A backup of the previous output left by a ``--force``
    rewrite killed between its two renames (see ``publish``) is moved back to ``out`` if ``out``
    is missing -- otherwise removed. Returns one line per action, for the user.
    """
    notes = []
    stem = f".{out.name}{_TMP_TAG}"
    for p in sorted(out.parent.glob(glob.escape(stem) + "*")):
        tail = p.name[len(stem):]
        backup = tail.startswith("old-")
        try:
            pid = int(tail[4:] if backup else tail)
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        if backup and not (out.exists() or out.is_symlink()):
            p.rename(out)
            notes.append(f"restored {out} from {p.name}, left by an interrupted --force rewrite")
        else:
            _remove(p)
            notes.append(f"removed stale temporary {p}")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a complete ``tmp`` into place as ``out``; an existing ``out`` needs ``force``.

    Replacing takes two renames (``out`` -> backup, ``tmp`` -> ``out``); an exception between
    them puts the backup back, and a SIGKILL between them leaves the backup for the next run's
    ``clean_stale_temporaries`` to restore. Either way the previous output is never lost.
    """
    if out.exists() or out.is_symlink():
        if not force:
            raise RQError(f"output {out} already exists (use --force to replace it)")
        old = out.parent / f".{out.name}{_TMP_TAG}old-{os.getpid()}"
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        _remove(old)
    else:
        tmp.rename(out)
