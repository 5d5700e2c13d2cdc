"""Output side of the streaming rewrite: bounded shard buffers, index, manifest, atomic publish."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__, defaults
from ..errors import RQError

INDEX_FILE = "model.safetensors.index.json"


class ShardWriter:
    """Buffers tensors and writes a safetensors shard whenever ``max_bytes`` would be exceeded."""

    def __init__(self, directory: Path, max_bytes: int = defaults.SHARD_BYTES):
        self.dir = directory
        self.max_bytes = max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        part = self.dir / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(part), metadata={"format": "pt"})
        self.parts.append((part, sorted(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporaries of earlier interrupted rewrites of ``out`` whose process is gone."""
    removed = []
    for p in out.parent.glob(f".{out.name}{_TMP_TAG}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a complete ``tmp`` into place as ``out``; an existing ``out`` needs ``force``."""
    if out.exists() or out.is_symlink():
        if not force:
            raise RQError(f"output {out} already exists (use --force to replace it)")
        old = out.parent / f".{out.name}{_TMP_TAG}old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
