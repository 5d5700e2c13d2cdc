"""Output side of the streaming rewrite: streamed safetensors shards, index, manifest, atomic publish."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import queue
import sys
import threading
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch

from .. import __version__, defaults
from ..checkpoint import TORCH_TO_ST as _ST_DTYPES
from ..checkpoint import FileSpan
from ..errors import RQError

_METADATA = '"__metadata__":{"format":"pt"}'


@dataclass(frozen=True)
class Entry:
    """One output tensor, known before any data is written: key, dtype, shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[tuple[Entry, int]]]:
    """``entries`` in order -> shards of ``(entry, data offset)``: at most ``max_bytes`` of data each
    (a larger tensor gets a shard of its own); a tensor that would start misaligned for its dtype
    starts a new shard (safetensors data has no holes, and starts 8-byte aligned)."""
    shards: list[list[tuple[Entry, int]]] = []
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise RQError(f"cannot store tensor {e.key!r} of dtype {e.dtype} in safetensors")
        n = e.nbytes
        if not shards or (shards[-1] and (offset + n > max_bytes or offset % e.dtype.itemsize)):
            shards.append([])
            offset = 0
        shards[-1].append((e, offset))
        offset += n
    return shards


def _header(shard: list[tuple[Entry, int]]) -> bytes:
    """The safetensors header (8-byte length + JSON, padded with spaces so data starts 8-aligned)."""
    items = [_METADATA] + [
        f"{json.dumps(e.key)}:" + json.dumps({"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape),
                                              "data_offsets": [off, off + e.nbytes]}, separators=(",", ":"))
        for e, off in shard]
    body = ("{" + ",".join(items) + "}").encode()
    body = body.ljust(-(-len(body) // 8) * 8, b" ")
    return len(body).to_bytes(8, "little") + body


Chunk = Union[torch.Tensor, FileSpan, Callable[[], torch.Tensor]]

# errors that mean "this kernel / file system cannot sendfile file to file": write the bytes instead
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP}


class ShardWriter:
    """Writes planned tensors into safetensors shards from background threads, hashing as it writes.

    Every output tensor is known up front (``entries``, in order), so each shard's header is written
    first and the file is produced front to back: a writer thread writes, a hash thread computes the
    shard's hash (``defaults.MANIFEST_HASH``) over the same buffers (no read-back for the manifest). ``add(key, chunks)`` queues
    the next entry's bytes as a tensor or a list of chunks (tensors, ``FileSpan``s of bytes kept as
    stored, copied file to file, or callables returning a tensor)
    whose bytes in order form the tensor -- so a replica is written straight from the source's
    memory-mapped tensors, never copied into a stacked buffer first. Callables run on ``pool`` (if
    given) up to ``prefetch`` chunks ahead of the write: quantizing overlaps with I/O. At most
    ``inflight_bytes`` are queued (``add`` blocks): memory stays flat while disk and CPU overlap.
    Use as a context manager; an error in a thread is raised in the caller at the next ``add`` or at
    ``finish``.
    """

    def __init__(self, directory: Path, entries: list[Entry], max_bytes: int = defaults.SHARD_BYTES,
                 inflight_bytes: int = defaults.WRITE_INFLIGHT_BYTES, pool: Executor | None = None,
                 prefetch: int = 4):
        self.dir = Path(directory)
        self.shards = plan_shards(list(entries), max_bytes)
        n = len(self.shards)
        self.names = ["model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.parts = [self.dir / f".part-{i:05d}.safetensors" for i in range(n)]
        self.total_bytes = sum(e.nbytes for shard in self.shards for e, _ in shard)
        self.digests: dict[str, str] = {}
        self._order = [(si, e) for si, shard in enumerate(self.shards) for e, _ in shard]
        self._sendfile = sys.platform.startswith("linux") and hasattr(os, "sendfile")
        self._src_fds: dict[Path, int] = {}
        self._next = 0
        self._limit = inflight_bytes
        self._pool, self._prefetch = pool, max(1, prefetch)
        self._inflight = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._digests: dict[int, str] = {}
        self._writeq: queue.Queue = queue.Queue()
        self._hashq: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._guard, args=(self._write_loop,), daemon=True),
                         threading.Thread(target=self._guard, args=(self._hash_loop,), daemon=True)]
        for t in self._threads:
            t.start()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop()

    # ------------------------------------------------------------------ caller side
    def add(self, key: str, data: Chunk | list[Chunk]) -> None:
        """Queue the bytes of the next planned entry (its key must be ``key``)."""
        self._raise()
        if self._next >= len(self._order) or self._order[self._next][1].key != key:
            want = self._order[self._next][1].key if self._next < len(self._order) else None
            raise AssertionError(f"ShardWriter: got {key!r}, planned {want!r}")
        si, entry = self._order[self._next]
        self._next += 1
        with self._cv:
            while self._inflight and self._inflight + entry.nbytes > self._limit and self._error is None:
                self._cv.wait()
            self._inflight += entry.nbytes
        self._raise()
        self._writeq.put((si, entry, data if isinstance(data, list) else [data]))

    def finish(self) -> dict[str, str]:
        """Wait for the threads, name the shards ``model-0000i-of-0000n.safetensors``, write the index;
        returns weight_map. ``self.digests`` then holds each shard's hash (by final name)."""
        if self._next != len(self._order):
            raise AssertionError(f"ShardWriter: {len(self._order) - self._next} planned tensors never added")
        self._stop()
        self._raise()
        weight_map = {}
        for part, name, shard in zip(self.parts, self.names, self.shards):
            part.rename(self.dir / name)
            weight_map.update({e.key: name for e, _ in shard})
        self.digests = {self.names[i]: h for i, h in self._digests.items()}
        index = {"metadata": {"total_size": self.total_bytes, "format": defaults.SLOT_FORMAT[0],
                              "version": defaults.SLOT_FORMAT[1]}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.dir / defaults.INDEX_FILE, index)
        return weight_map

    def _stop(self) -> None:
        if self._threads:
            self._writeq.put(None)
            for t in self._threads:
                t.join()
            self._threads = []

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ threads
    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:  # handed to the caller (next add / finish)
            with self._cv:
                if self._error is None:
                    self._error = e
                self._cv.notify_all()

    def _write_loop(self) -> None:
        """Shards front to back: header, then each entry's chunks; every buffer goes on to the hasher."""
        f, current = None, -1
        try:
            while (item := self._writeq.get()) is not None:
                if self._error is not None:
                    continue  # drain: the caller raises, nothing more is written
                si, entry, chunks = item
                if si != current:
                    if f is not None:
                        f.close()
                        self._hashq.put((current, None, 0))
                    f, current = self.parts[si].open("wb"), si
                    head = _header(self.shards[si])
                    f.write(head)
                    self._hashq.put((si, memoryview(head), 0))
                written = 0
                for i, t in enumerate(self._resolved(chunks)):
                    if isinstance(t, FileSpan):
                        buf = _bytes(t.tensor, entry, i)
                        if len(buf) != t.nbytes:
                            raise AssertionError(f"ShardWriter: {entry.key} chunk {i} spans {t.nbytes} bytes, its tensor {len(buf)}")
                        if not self._send(f, t):
                            f.write(buf)
                    else:
                        buf = _bytes(t, entry, i)
                        f.write(buf)
                    written += len(buf)
                    self._hashq.put((si, buf, entry.nbytes if i == len(chunks) - 1 else 0))
                if written != entry.nbytes:
                    raise AssertionError(f"ShardWriter: {entry.key} got {written} bytes, planned {entry.nbytes}")
                if not chunks:
                    self._release(entry.nbytes)
            if f is not None:
                f.close()
                self._hashq.put((current, None, 0))
        finally:
            if f is not None and not f.closed:
                f.close()
            for fd in self._src_fds.values():
                os.close(fd)
            self._src_fds.clear()
            self._hashq.put(None)

    def _send(self, f, span: FileSpan) -> bool:
        """Copy ``span`` into ``f`` at its position with ``os.sendfile``; False (nothing written) where
        the kernel cannot, and from then on the writer writes the span's tensor instead."""
        if not self._sendfile or not span.nbytes:
            return False
        fd = self._src_fds.get(span.path)
        if fd is None:
            fd = self._src_fds[span.path] = os.open(span.path, os.O_RDONLY)
        f.flush()
        out, done = f.fileno(), 0
        while done < span.nbytes:
            try:
                n = os.sendfile(out, fd, span.offset + done, span.nbytes - done)
            except OSError as e:
                if done == 0 and e.errno in _NO_SENDFILE:
                    self._sendfile = False
                    return False
                raise
            if n == 0:
                raise OSError(errno.EIO, f"{span.path} ended {span.nbytes - done} bytes early (changed while rq read it?)")
            done += n
        return True

    def _resolved(self, chunks: list[Chunk]):
        """The chunks' tensors in order; callables run on the pool, ``prefetch`` chunks ahead."""
        if self._pool is None:
            yield from (c() if callable(c) else c for c in chunks)
            return
        window: deque = deque()
        it = iter(chunks)
        for c in it:
            window.append(self._pool.submit(c) if callable(c) else c)
            if len(window) >= self._prefetch:
                break
        while window:
            head = window.popleft()
            yield head.result() if isinstance(head, Future) else head
            for c in it:
                window.append(self._pool.submit(c) if callable(c) else c)
                break

    def _hash_loop(self) -> None:
        h, current = None, -1
        while (item := self._hashq.get()) is not None:
            si, buf, release = item
            if buf is None:  # shard closed
                self._digests[si] = h.hexdigest()
                continue
            if si != current:
                h, current = new_hash(), si
            h.update(buf)
            if release:
                self._release(release)

    def _release(self, n: int) -> None:
        with self._cv:
            self._inflight -= n
            self._cv.notify_all()


def _bytes(t: torch.Tensor, entry: Entry, i: int) -> memoryview:
    if t.dtype != entry.dtype:
        raise AssertionError(f"ShardWriter: {entry.key} chunk {i} is {t.dtype}, planned {entry.dtype}")
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


# manifest file hashes by name: v2 writes xxh3-128 (~5 GB/s a core here, against sha256's ~1.4 GB/s:
# at hundreds of GB the hash of the output would otherwise bound the rewrite); v1's sha256 still verifies
HASHES = {"xxh3_128": None, "sha256": hashlib.sha256}


def new_hash(name: str = defaults.MANIFEST_HASH):
    """A fresh hash object of ``name`` (``HASHES``): ``update(buffer)``, ``hexdigest()``."""
    if name == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    return HASHES[name]()


def hash_file(path: Path, name: str = defaults.MANIFEST_HASH, chunk: int = 1 << 22) -> str:
    h = new_hash(name)
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, known: dict[str, str] | None = None) -> dict:
    """Hash (``defaults.MANIFEST_HASH``) and size of every file in ``directory`` (the manifest itself excluded).

    ``known``: relative name -> hash already computed while the file was written (ShardWriter).
    """
    files = {}
    known = known or {}
    algo = defaults.MANIFEST_HASH
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != defaults.MANIFEST_FILE:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {algo: known.get(rel) or hash_file(p), "bytes": p.stat().st_size}
    manifest = {"format": defaults.MANIFEST_FORMAT[0], "version": defaults.MANIFEST_FORMAT[1],
                "rq_version": __version__, "hash": algo, "files": files}
    write_json(directory / defaults.MANIFEST_FILE, manifest)
    return manifest


# ---------------------------------------------------------------------------- atomic publish
# the one output policy (unique temporaries, locks, stale clean-up, two-rename replace) lives in
# rq_tool.outputs; these names stay importable from here
from ..outputs import clean_stale_temporaries, publish  # noqa: E402,F401
