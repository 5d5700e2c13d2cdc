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
        inter = _intermediate_size(keys, prefix, dict.fromkeys(lm.slot_scheme), H)
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


def _intermediate_size(keys: dict, prefix: str, schemes, hidden: int) -> int:
    """The experts' intermediate size, read from the first stored group that shows it (0 if none).

    Float and int8 groups store ``down [n, H, I]``; nf4 stores ``gate_up`` packed as ``[n, I * H]``
    (2I x H 4-bit values, two per byte) -- so a layer whose slot 0 is nf4 is read correctly too.
    """
    for scheme in schemes:
        down = keys.get(f"{prefix}{scheme}_down")
        if down is not None and len(down.shape) == 3:
            return int(down.shape[-1])
        gate_up = keys.get(f"{prefix}{scheme}_gate_up")
        if scheme == "nf4" and gate_up is not None and len(gate_up.shape) == 2 and hidden:
            return int(gate_up.shape[1]) // hidden
    return 0
