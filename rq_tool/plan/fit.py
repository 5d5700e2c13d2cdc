"""Make a plan's slots pack onto G expert-parallel devices within the original per-device memory.

A plan within its budget in *total* bytes may still not bin-pack into G equal device shares
(mixed slot sizes: e.g. each int8 slot displaces two nf4 slots in a share). ``fit_devices``
repairs each layer until ``place_slots`` finds a placement with capacity ``bytes_before / G``:
first by storing a slot in a cheaper scheme (least added error per byte saved), and only when
no cheaper scheme is left by dropping the replica whose removal raises LIS least.

Legend: L MoE layers, E logical experts, P physical slots, S schemes, G devices.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import RQError
from ..lis import slot_loads
from .placement import place_slots
from .predict import predict_layer
from .types import LayerPlan, Plan


def _packs(load: torch.Tensor, lp_phy2log, slot_scheme, nbytes, G: int, capacity: int) -> bool:
    logcnt = torch.bincount(lp_phy2log, minlength=load.numel())
    try:
        place_slots(slot_loads(load, lp_phy2log, logcnt), nbytes[slot_scheme], G, capacity)
    except RQError:
        return False
    return True


def _fit_layer(lp: LayerPlan, load: torch.Tensor, error: torch.Tensor, nbytes: torch.Tensor, G: int) -> LayerPlan:
    """``load [E]``, ``error [E, S]``, ``nbytes [S]`` -> the layer, repaired to pack on G devices."""
    capacity = lp.bytes_before // G
    phy2log, scheme = lp.phy2log.clone(), lp.slot_scheme.clone()
    E = load.numel()
    while not _packs(load, phy2log, scheme, nbytes, G, capacity):
        logcnt = torch.bincount(phy2log, minlength=E).double()
        best = None  # (added error per byte saved, slot, new scheme)
        for p in range(phy2log.numel()):
            e, s = int(phy2log[p]), int(scheme[p])
            for t in range(nbytes.numel()):
                saved = int(nbytes[s] - nbytes[t])
                if saved <= 0:
                    continue
                added = float(error[e, t] - error[e, s]) / float(logcnt[e])
                cost = max(added, 0.0) / saved
                if best is None or cost < best[0]:
                    best = (cost, p, t)
        if best is not None:
            scheme[best[1]] = best[2]
            continue
        replicas = [p for p in range(E, phy2log.numel())]
        if not replicas:
            raise RQError(f"layer {lp.layer}: even the originals in the cheapest scheme do not pack onto {G} devices")

        def lis_without(p):
            keep = torch.ones(phy2log.numel(), dtype=torch.bool)
            keep[p] = False
            ph = phy2log[keep]
            return float(slot_loads(load, ph, torch.bincount(ph, minlength=E)).max())

        drop = min(replicas, key=lis_without)
        keep = torch.ones(phy2log.numel(), dtype=torch.bool)
        keep[drop] = False
        phy2log, scheme = phy2log[keep], scheme[keep]
    if torch.equal(phy2log, lp.phy2log) and torch.equal(scheme, lp.slot_scheme):
        return lp
    pred = predict_layer(load, error, nbytes, phy2log, scheme)
    return dataclasses.replace(lp, phy2log=phy2log, slot_scheme=scheme, **pred)


def fit_devices(plan: Plan, load: torch.Tensor, error: torch.Tensor, num_devices: int) -> Plan:
    """``plan`` with every layer packable onto ``num_devices`` devices of ``bytes_before / G`` each.

    ``load [L, E]`` and ``error [L, E, S]`` are the planner's inputs. Only makes layers cheaper
    (bytes never grow), so a plan within its budget stays within it.
    """
    if num_devices < 1:
        raise RQError(f"--ep-devices must be >= 1, got {num_devices}")
    nbytes = torch.tensor(plan.scheme_bytes, dtype=torch.int64)
    layers = tuple(_fit_layer(lp, load[i].double(), error[i].double(), nbytes, int(num_devices))
                   for i, lp in enumerate(plan.layers))
    return dataclasses.replace(plan, layers=layers)
