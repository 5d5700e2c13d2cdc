"""Give a rewritten model a device placement for G expert-parallel ranks (routing map v2).

Legend: L MoE layers, E logical experts, P physical slots, G devices.

Stopgap until ``rq rewrite --ep-size G`` writes the placement itself: ``place_routing_map`` (pure)
places every layer's slots with ``rq_tool.plan.placement.place_slots`` on the calibration loads
(each expert's load split evenly over its replicas), heaviest first, each device within
``ceil(layer bytes / G)`` (grown by the smallest slot until the slots pack);
``write_placed_copy`` writes a copy of a rewritten directory with that map (new manifest;
the source is never touched).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from .. import defaults
from ..checkpoint import DTYPES
from ..calibrate.profile import Profile
from ..errors import RQError, read_json
from ..eval.ep import place_in_share
from .routing_map import RoutingMap

_EXPERT_KEY = re.compile(r"layers\.(\d+)\..*experts\.([a-z0-9]+)_(?:gate_up|down)(?:_scale_inv|_scale|_absmax)?$")
_BIAS_KEY = re.compile(r"layers\.(\d+)\..*experts\.(?:gate_up|down)_bias$")


def place_routing_map(rmap: RoutingMap, plan_load: torch.Tensor, slot_bytes: list[torch.Tensor], num_devices: int,
                      split_policy: str = defaults.LOAD_AWARE_POLICY) -> RoutingMap:
    """``plan_load [L, E]`` loads to plan on (layers in ``rmap.layers`` order), ``slot_bytes`` L x ``[P]``
    -> the map with ``num_devices`` and every layer's ``slot_device`` set, ``split_policy`` chosen."""
    layers = []
    for lm, load, nbytes in zip(rmap.layers, plan_load, slot_bytes, strict=True):
        slot_load = load.double()[lm.phy2log] / lm.logcnt.double()[lm.phy2log]
        layers.append(replace(lm, slot_device=place_in_share(slot_load, nbytes, num_devices, 0)))
    placed = replace(rmap, layers=layers, num_devices=int(num_devices), split_policy=split_policy)
    placed.validate("placed routing map")
    return placed


def slot_bytes_of(path: Path, rmap: RoutingMap) -> list[torch.Tensor]:
    """L x ``[P]`` stored bytes of every slot, read from the safetensors headers (no tensor data)."""
    group: dict[tuple[int, str], int] = {}
    bias: dict[int, int] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                m, b = _EXPERT_KEY.search(key), _BIAS_KEY.search(key)
                if not (m or b):
                    continue
                sl = f.get_slice(key)
                n = torch.Size(sl.get_shape()).numel() * DTYPES[sl.get_dtype()][1]
                if m:
                    group[(int(m.group(1)), m.group(2))] = group.get((int(m.group(1)), m.group(2)), 0) + n
                else:
                    bias[int(b.group(1))] = bias.get(int(b.group(1)), 0) + n
    out = []
    for lm in rmap.layers:
        per = {s: lm.slot_scheme.count(s) for s in set(lm.slot_scheme)}
        if any((lm.layer, s) not in group for s in per):
            raise RQError(f"{path}: no expert tensors found for layer {lm.layer}")
        out.append(torch.tensor([group[(lm.layer, s)] // per[s] + bias.get(lm.layer, 0) // lm.num_slots
                                 for s in lm.slot_scheme], dtype=torch.int64))
    return out


def write_placed_copy(src, out, num_devices: int, split_policy: str = defaults.LOAD_AWARE_POLICY) -> RoutingMap:
    """Copy the rewritten directory ``src`` to ``out`` with a placement for ``num_devices`` ranks."""
    from ..rewrite.shards import write_json, write_manifest

    src, out = Path(src), Path(out)
    if out.exists():
        raise RQError(f"output {out} already exists")
    config = read_json(src / "config.json", f"{src} is not a model directory (no config.json)")
    rmap = RoutingMap.from_dict(config["rq"]["routing_map"], where=f"{src}/config.json routing map")
    profile = Profile.load(src / defaults.PROFILE_FILE)
    by_layer = {lp.layer: lp.load for lp in profile.layers}
    plan_load = torch.stack([by_layer[lm.layer] for lm in rmap.layers])
    placed = place_routing_map(rmap, plan_load, slot_bytes_of(src, rmap), num_devices, split_policy)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    config["rq"]["routing_map"] = placed.to_dict()
    write_json(tmp / "config.json", config)
    write_json(tmp / defaults.ROUTING_MAP_FILE, placed.to_dict())
    write_manifest(tmp)
    tmp.rename(out)
    return placed
