"""One output-safety policy for every command that writes (calibrate, rewrite, export, report, eval --out).

1. **Never into, over or around an input.** An output path that is, contains, or lies inside any
   input path (paths resolved, symlinks followed, hard links compared by inode) is refused.
2. **``--force`` replaces only what rq wrote.** An existing output is replaced only with
   ``--force``, and only when it is recognisably an rq output of the same kind: a directory whose
   rq marker file (``rq_manifest.json`` of a rewritten model, ``rq_report.json`` of a report)
   is valid and lists every file in the directory (nothing the user added would be deleted); a
   file whose JSON carries the rq format of that kind (``rq-profile``, ``rq-eval``) or is the
   engine file rq export writes. Anything else is refused, with or without ``--force``.
3. **Atomic.** Everything is written under a unique temporary name beside the output
   (``.NAME.rq-tmp-HOST-PID-RANDOM``: unique across hosts and PID namespaces) and renamed into
   place when complete; a directory replaced with ``--force`` is first moved to a backup that an
   interrupted run's successor restores. Each temporary has a lock file (``...lock``) that its
   writer holds (``flock``) while it lives, so a later run removes only temporaries whose writer
   is gone -- never a live one of another process, container or host on the same filesystem.
4. **Signals.** While writing, SIGTERM and SIGHUP are handled like SIGINT (``Terminated``, a
   ``KeyboardInterrupt``): the temporary is removed and nothing is published.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import RQError

TMP_TAG = ".rq-tmp-"


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP while rq runs: unwinds like Ctrl-C (temporaries removed, nothing published)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------- output kinds
@dataclass(frozen=True)
class OutputKind:
    """What a command writes: a file or a directory, and how to recognise one rq wrote earlier."""

    name: str  # for messages: "profile", "rewritten model", ...
    is_dir: bool
    recognize: Callable[[Path], bool]  # is this existing path an rq-written output of this kind?


def _json_of(path: Path):
    from .validate import read

    try:
        return read(path) if path.is_file() else None
    except RQError:
        return None


def json_file_kind(name: str, formats: Iterable[str] = (), shapes: Callable[[dict], bool] | None = None) -> OutputKind:
    """A JSON file recognised by its ``format`` (one of ``formats``) or by ``shapes(d)``."""
    formats = tuple(formats)

    def recognize(path: Path) -> bool:
        d = _json_of(path)
        return isinstance(d, dict) and (d.get("format") in formats or bool(shapes and shapes(d)))

    return OutputKind(name, False, recognize)


def marked_dir_kind(name: str, marker: str, fmt: str) -> OutputKind:
    """A directory recognised by a marker file of format ``fmt`` that lists every file in it."""

    def recognize(path: Path) -> bool:
        if not path.is_dir() or path.is_symlink():
            return False
        d = _json_of(path / marker)
        if not isinstance(d, dict) or d.get("format") != fmt or not isinstance(d.get("files"), dict):
            return False
        listed = set(d["files"])
        for p in path.rglob("*"):
            if p.is_symlink() or (p.is_file() and p.name != marker and p.relative_to(path).as_posix() not in listed):
                return False
        return True

    return OutputKind(name, True, recognize)


# ------------------------------------------------------------------------------- the checks
def _resolve(p) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def check_output(out, kind: OutputKind, inputs: Iterable = (), force: bool = False, notify=None) -> Path:
    """Apply rules 1 and 2 to ``out`` before any work is done; tidy stale temporaries first."""
    out = Path(out).expanduser()
    for note in clean_stale_temporaries(out):
        (notify or _stderr)(note)
    real = _resolve(out)
    for inp in inputs:
        if inp is None:
            continue
        r = _resolve(inp)
        same = real == r or (out.exists() and Path(inp).exists() and _same_file(out, Path(inp)))
        if same:
            raise RQError(f"output {out} is the input {inp}; rq never writes over its inputs")
        if r.is_relative_to(real):
            raise RQError(f"output {out} contains the input {inp}; rq never writes over its inputs")
        if Path(inp).is_dir() and real.is_relative_to(r):
            raise RQError(f"output {out} lies inside the input {inp}; rq never writes into its inputs")
    if out.exists() or out.is_symlink():
        if not kind.recognize(out):
            what = "directory" if out.is_dir() else "file"
            raise RQError(f"output {out} already exists and is not an rq {kind.name} {what}; rq only ever replaces "
                          "what it wrote itself, even with --force (choose another output path)")
        if not force:
            raise RQError(f"output {out} already exists (use --force to replace it)")
    elif not out.parent.is_dir():
        if not kind.is_dir:
            raise RQError(f"output {out}: directory {str(out.parent)!r} does not exist")
        ancestor = next(p for p in out.parents if p.exists() or p == p.parent)
        if ancestor.exists() and not ancestor.is_dir():
            raise RQError(f"output {out}: {ancestor} is a file, not a directory")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _stderr(note: str) -> None:
    print(f"rq: {note}", file=sys.stderr)


# ----------------------------------------------------------------------------- temporaries
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"


def _temp_name(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock(path: Path):
    """Create ``path`` and hold an exclusive flock on it; returns the open fd."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        pass  # no flock on this filesystem: liveness falls back to the name's host and pid
    return fd


def _owner_alive(lock: Path, tag: str) -> bool:
    """Whether the writer of a temporary still runs: its lock is held (any process, container, host)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except (ImportError, OSError):  # cannot tell by lock: same host and a live pid
        parts = tag.rsplit("-", 2)
        return len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and _pid_alive(int(parts[1]))
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int) -> bool:
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
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def clean_stale_temporaries(out: Path) -> list[str]:
    """Tidy up after earlier writes of ``out`` whose writer is gone (killed, crashed, power loss).

    Their temporaries are removed. A backup of the previous output left by a ``--force`` replace
    killed between its two renames is moved back to ``out`` if ``out`` is missing -- otherwise
    removed. Names of rq <= 0.1 (``.NAME.rq-tmp-PID``, ``...-old-PID``) are judged by their pid.
    Returns one line per action, for the user.
    """
    out = Path(out)
    notes = []
    stem = f".{out.name}{TMP_TAG}"
    if not out.parent.is_dir():
        return notes
    entries = sorted(out.parent.glob(glob.escape(stem) + "*"))
    for p in entries:
        tail = p.name[len(stem):]
        if tail.endswith(".lock"):
            continue
        backup = tail.endswith(".old") or tail.startswith("old-")
        legacy = re.fullmatch(r"(old-)?(\d+)", tail)
        if legacy:
            pid = int(legacy.group(2))
            if pid == os.getpid() or _pid_alive(pid):
                continue
        else:
            tag = tail[:-4] if tail.endswith(".old") else tail
            if _owner_alive(out.parent / f"{stem}{tag}.lock", tag):
                continue
        if backup and not (out.exists() or out.is_symlink()):
            p.rename(out)
            notes.append(f"restored {out} from {p.name}, left by an interrupted --force rewrite")
        else:
            _remove(p)
            notes.append(f"removed stale temporary {p}")
    for lock in out.parent.glob(glob.escape(stem) + "*.lock"):  # locks whose writer is gone
        base = lock.name[: -len(".lock")]
        if not _owner_alive(lock, base[len(stem):]) and not any(
                (out.parent / n).exists() for n in (base, base + ".old")):
            _remove(lock)
    return notes


# -------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def signals_as_interrupt():
    """Within the block, SIGTERM / SIGHUP raise ``Terminated`` (main thread, default handlers only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        raise Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


# ---------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def staged(out, kind: OutputKind | None = None, inputs: Iterable = (), force: bool = False):
    """Yield a fresh temporary path beside ``out`` (a directory for directory kinds, else a file
    path to create); on success publish it as ``out`` atomically, on any exception remove it.

    ``kind=None``: no policy (library saves of a single file): just unique-temp + rename.
    """
    out = Path(out).expanduser()
    inputs = list(inputs)
    if kind is not None:
        check_output(out, kind, inputs, force)
    tmp = _temp_name(out)
    lock_path = tmp.with_name(tmp.name + ".lock")
    with signals_as_interrupt():
        try:
            if kind is not None and kind.is_dir:
                out.parent.mkdir(parents=True, exist_ok=True)  # a directory output's parents are made
            fd = _lock(lock_path)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise RQError(f"cannot create the output beside {out} ({e.strerror or e}{where})") from None
        try:
            if kind is not None and kind.is_dir:
                tmp.mkdir()
            yield tmp
            if kind is not None:
                check_output(out, kind, inputs, force)  # again: something may have appeared meanwhile
            _publish(tmp, out, force=force)
        except BaseException:
            _remove(tmp)
            raise
        finally:
            os.close(fd)
            _remove(lock_path)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if tmp.is_dir():
        publish(tmp, out, force)
    else:
        if out.is_dir() and not out.is_symlink():
            raise RQError(f"output {out} is a directory")
        os.replace(tmp, out)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move a complete directory ``tmp`` into place as ``out``; an existing ``out`` needs ``force``.

    Replacing takes two renames (``out`` -> backup, ``tmp`` -> ``out``); an exception between
    them puts the backup back, and a SIGKILL between them leaves the backup for the next run's
    ``clean_stale_temporaries`` to restore. Either way the previous output is never lost.
    """
    if out.exists() or out.is_symlink():
        if not force:
            raise RQError(f"output {out} already exists (use --force to replace it)")
        old = tmp.with_name(tmp.name + ".old")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        _remove(old)
    else:
        tmp.rename(out)


def write_text(out, text: str, kind: OutputKind | None = None, inputs: Iterable = (), force: bool = False) -> Path:
    """Write ``text`` to ``out`` through ``staged`` (flushed to disk before the rename)."""
    out = Path(out).expanduser()
    with staged(out, kind, inputs, force) as tmp:
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise RQError(f"writing {out} failed ({e.strerror}); nothing was written") from None
            raise
    return out
