"""``rq verify OUT``: re-hash every file against the manifest and check the routing map against
the config and the stored tensors (from safetensors headers; no weights are loaded)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import defaults
from ..errors import RQError
from ..runtime.experts import slot_tensor_shapes
from ..runtime.hf import read_rq_config
from ..runtime.routing_map import RoutingMap
from .shards import sha256_file
from .source import SafetensorsCheckpoint


def verify(out) -> list[str]:
    """Return a list of problems (empty = verified). Raises RQError if ``out`` is not an rq model."""
    out = Path(out)
    if not out.is_dir():
        raise RQError(f"{out} is not a directory")
    problems: list[str] = []
    mpath = out / defaults.MANIFEST_FILE
    if not mpath.is_file():
        raise RQError(f"{out} has no {defaults.MANIFEST_FILE}; not a complete rq output")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RQError(f"{mpath}: malformed manifest ({type(e).__name__})") from None
    if (manifest.get("format"), manifest.get("version")) != defaults.MANIFEST_FORMAT:
        problems.append(f"manifest format {manifest.get('format')!r} v{manifest.get('version')} is not supported")
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != defaults.MANIFEST_FILE}
    for name in sorted(set(files) - on_disk):
        problems.append(f"{name}: listed in the manifest but missing")
    for name in sorted(on_disk - set(files)):
        problems.append(f"{name}: not in the manifest")
    for name in sorted(set(files) & on_disk):
        p = out / name
        if p.stat().st_size != files[name].get("bytes") or sha256_file(p) != files[name].get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest")
    if problems:
        return problems
    d = read_rq_config(out)
    try:
        rmap = RoutingMap.from_dict(d["rq"]["routing_map"], where="config.json routing map")
    except RQError as e:
        return [str(e)]
    rpath = out / defaults.ROUTING_MAP_FILE
    if not rpath.is_file() or json.loads(rpath.read_text()) != d["rq"]["routing_map"]:
        problems.append(f"{defaults.ROUTING_MAP_FILE} differs from the routing map in config.json")
    try:
        ckpt = SafetensorsCheckpoint(out)
    except RQError as e:
        return problems + [str(e)]
    problems += _check_slot_tensors(ckpt, rmap, d)
    return problems


def _check_slot_tensors(ckpt: SafetensorsCheckpoint, rmap: RoutingMap, config: dict) -> list[str]:
    problems = []
    H = int(config["hidden_size"])
    for lm in rmap.layers:
        pat = re.compile(rf"(^|\.)layers\.{lm.layer}\.[A-Za-z_]+\.experts\.")
        keys = {k: v for k, v in ckpt.tensors.items() if pat.search(k)}
        if not keys:
            problems.append(f"layer {lm.layer}: no slot tensors stored")
            continue
        prefix = next(iter(keys)).rsplit(".experts.", 1)[0] + ".experts."
        first = f"{prefix}{lm.slot_scheme[0]}_down"
        inter = keys[first].shape[-1] if first in keys and len(keys[first].shape) == 3 else None
        if inter is None:
            gu = keys.get(f"{prefix}{lm.slot_scheme[0]}_gate_up")
            inter = (gu.shape[1] // 2) if gu is not None and len(gu.shape) == 3 else 0
        expected = {}
        for scheme in dict.fromkeys(lm.slot_scheme):
            n = sum(1 for s in lm.slot_scheme if s == scheme)
            for name, shape in slot_tensor_shapes(scheme, n, H, inter).items():
                expected[f"{prefix}{scheme}_{name}"] = shape
        if f"{prefix}gate_up_bias" in keys:
            expected[f"{prefix}gate_up_bias"] = (lm.num_slots, 2 * inter)
            expected[f"{prefix}down_bias"] = (lm.num_slots, H)
        for k, shape in expected.items():
            if k not in keys:
                problems.append(f"layer {lm.layer}: {k} missing")
            elif tuple(keys[k].shape) != tuple(shape):
                problems.append(f"layer {lm.layer}: {k} has shape {tuple(keys[k].shape)}, routing map needs {shape}")
        for k in sorted(set(keys) - set(expected)):
            problems.append(f"layer {lm.layer}: unexpected tensor {k}")
    return problems
