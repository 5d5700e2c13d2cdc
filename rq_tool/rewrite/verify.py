"""``rq verify OUT``: re-hash every file against the manifest, then run the loader's own integrity
checks (``rq_tool.runtime.integrity``: shard paths, slot tensor dtypes and shapes against the
routing map, activation against the base config, the recorded header fingerprint) -- so "verify
OK" means "``rq_tool.load`` gives the planned model". Headers only; no weights are loaded."""

from __future__ import annotations

from pathlib import Path

from .. import defaults
from ..errors import RQError, check_format
from ..runtime import integrity
from ..runtime.model_dir import read_rq_model
from ..validate import check_dict, check_int, check_str, get, read
from .shards import HASHES, hash_file


def read_manifest(out: Path) -> tuple[str, dict[str, dict]]:
    """``(hash name, {relative name: {hash name: hex, "bytes"}})`` of ``out``'s manifest, validated
    (names stay inside ``out``). v1 manifests hash with sha256, v2 name their hash (``"hash"``)."""
    from ..checkpoint import inside

    mpath = out / defaults.MANIFEST_FILE
    where = str(mpath)
    manifest = read(mpath, f"{out} has no {defaults.MANIFEST_FILE}; not a complete rq output")
    version = check_format(manifest, defaults.MANIFEST_FORMAT, "manifest", where, defaults.MANIFEST_READABLE)
    algo = "sha256" if version == 1 else check_str(get(manifest, "hash", where), where, "hash", 32)
    if algo not in HASHES:
        raise RQError(f"{where}: unknown file hash {algo!r} (rq knows {', '.join(HASHES)})")
    files = check_dict(get(manifest, "files", where), where, "files")
    for name, entry in files.items():
        inside(out, name, where)
        check_str(get(entry, algo, where, f"files[{name!r}]"), where, f"files[{name!r}].{algo}", 64)
        check_int(get(entry, "bytes", where, f"files[{name!r}]"), where, f"files[{name!r}].bytes")
    return algo, files


def verify(out) -> list[str]:
    """Return a list of problems (empty = verified). Raises RQError if ``out`` is not an rq model."""
    out = Path(out)
    if not out.is_dir():
        raise RQError(f"{out} is not a directory")
    algo, files = read_manifest(out)
    problems: list[str] = []
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != defaults.MANIFEST_FILE}
    for name in sorted(set(files) - on_disk):
        problems.append(f"{name}: listed in the manifest but missing")
    for name in sorted(on_disk - set(files)):
        problems.append(f"{name}: not in the manifest")
    for name in sorted(set(files) & on_disk):
        p = out / name
        if p.stat().st_size != files[name]["bytes"] or hash_file(p, algo) != files[name][algo]:
            problems.append(f"{name}: {algo} differs from the manifest")
    if problems:
        return problems
    try:
        md = read_rq_model(out)
    except RQError as e:
        return [str(e)]
    rpath = out / defaults.ROUTING_MAP_FILE
    try:
        same = read(rpath) == md.rq["routing_map"]
    except RQError:
        same = False
    if not same:
        problems.append(f"{defaults.ROUTING_MAP_FILE} differs from the routing map in config.json")
    return problems + integrity.problems(out, md)
