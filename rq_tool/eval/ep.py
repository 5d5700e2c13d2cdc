"""Simulated expert parallelism: how evenly a layer's measured load spreads over G devices.

Legend: E logical experts, P physical slots, G devices.

Three deployments of one MoE layer, all scored on the same measured (held-out) loads:

- ``contiguous``: the standard EP layout of the original model, expert e on device
  ``e * G // E`` (E/G experts per device when G divides E).
- ``placed``: a model's own slots placed by ``rq_tool.plan.placement.place_slots`` (heaviest
  slot first onto the least-loaded device with room). Placement is *planned* on the loads the
  deployer knows in advance (``plan_slot_load``: the calibration profile's prediction) and scored
  on the measured ``slot_load``; with ``plan_slot_load=None`` it is planned on the measured loads
  (an oracle). Each device may hold the original model's per-device share of expert bytes
  (``E * source_bytes / G``); when the slots cannot be packed into that share (memory grew, or
  slot sizes do not bin-pack) the capacity grows by the smallest slot until they can, and
  ``device_bytes_ratio`` / ``fits_original_share`` report it.
- ``eplb``: DeepSeek EPLB (``rq_tool.plan.eplb.rebalance_experts``) given the same planning loads and
  ``ceil(P / G) * G`` full-precision slots; tokens split evenly over an expert's replicas.

Every result is ``max / mean`` of the device loads (1.0 = perfectly balanced).
"""

from __future__ import annotations

import math

import torch

from .. import defaults
from ..errors import RQError
from ..plan.eplb import rebalance_experts
from ..plan.placement import device_loads, max_mean, place_slots

DEVICE_COUNTS = defaults.DEVICE_COUNTS


def contiguous_devices(num_slots: int, num_devices: int) -> torch.Tensor:
    """``[P]`` int64: slot p on device ``p * G // P`` (equal consecutive blocks)."""
    return torch.arange(num_slots, dtype=torch.int64) * num_devices // num_slots


def contiguous_max_mean(load: torch.Tensor, num_devices: int) -> float:
    """Standard EP of the original experts: ``load [E]`` on ``G`` devices in consecutive blocks."""
    return max_mean(device_loads(load, contiguous_devices(load.numel(), num_devices), num_devices))


def place_in_share(plan_slot_load: torch.Tensor, slot_bytes: torch.Tensor, num_devices: int,
                   original_bytes: int) -> torch.Tensor:
    """``place_slots`` of ``plan_slot_load [P]`` / ``slot_bytes [P]`` on G devices -> ``[P]`` int64.
    Capacity starts at the larger of the original per-device share (``original_bytes // G``) and
    ``ceil(total / G)`` and grows by the smallest slot until the slots pack."""
    G = int(num_devices)
    slot_bytes = torch.as_tensor(slot_bytes, dtype=torch.int64)
    capacity = max(max(original_bytes // G, 1), math.ceil(int(slot_bytes.sum()) / G))
    step = max(int(slot_bytes.min()), 1)
    while True:
        try:
            return place_slots(plan_slot_load, slot_bytes, G, capacity)
        except RQError:
            capacity += step


def placed_max_mean(slot_load: torch.Tensor, slot_bytes: torch.Tensor, num_devices: int, original_bytes: int,
                    plan_slot_load: torch.Tensor | None = None) -> dict:
    """Place slots within memory, score on ``slot_load [P]``.

    ``slot_bytes [P]`` stored bytes of each slot; ``original_bytes``: the layer's original expert
    bytes (all E experts in the source scheme), so a device's share is ``original_bytes // G``;
    ``plan_slot_load [P]``: what placement is planned on (``None``: the measured loads).
    Capacity starts at the larger of that share and ``ceil(total / G)`` and grows by the smallest
    slot until ``place_slots`` finds a placement (a plan can fit the layer's budget and still not
    pack into equal device shares). Returns ``{"max_mean", "device_bytes_ratio"`` (fullest
    device / share), ``"fits_original_share"}``.
    """
    G = int(num_devices)
    slot_bytes = torch.as_tensor(slot_bytes, dtype=torch.int64)
    share = max(original_bytes // G, 1)
    dev = place_in_share(slot_load if plan_slot_load is None else plan_slot_load, slot_bytes, G, original_bytes)
    fullest = int(device_loads(slot_bytes, dev, G).max())
    return {"max_mean": max_mean(device_loads(slot_load, dev, G)), "device_bytes_ratio": fullest / share,
            "fits_original_share": fullest <= share}


def eplb_max_mean(load: torch.Tensor, num_slots: int, num_devices: int,
                  plan_load: torch.Tensor | None = None) -> dict:
    """DeepSeek EPLB with ``ceil(num_slots / G) * G`` slots planned on ``plan_load [E]``.

    Scored on ``load [E]`` split evenly over each expert's replicas. Returns ``{"max_mean",
    "slots"}`` (the slot count; EPLB keeps every replica in full precision).
    """
    G = int(num_devices)
    E = load.numel()
    P = max(math.ceil(num_slots / G), math.ceil(E / G)) * G
    plan = (load if plan_load is None else plan_load).double()[None]
    phy2log, _, logcnt = rebalance_experts(plan, P, 1, 1, G)
    slot_load = load.double()[phy2log[0]] / logcnt[0].double()[phy2log[0]]
    dev = torch.arange(P) // (P // G)
    return {"max_mean": max_mean(device_loads(slot_load, dev, G)), "slots": P}


def simulate_layer(load: torch.Tensor, slot_load: torch.Tensor, phy2log: torch.Tensor, slot_bytes: torch.Tensor,
                   original_bytes: int, plan_load: torch.Tensor | None = None,
                   device_counts=DEVICE_COUNTS) -> dict[int, dict]:
    """All three deployments of one layer for each G.

    ``load [E]`` measured logical loads; ``slot_load [P]`` measured slot loads (``load`` itself
    when the model has no replicas); ``phy2log [P]``; ``slot_bytes [P]``; ``plan_load [E]``
    the calibration loads placement is planned on (``None``: oracle). Returns
    ``{G: {"contiguous", "placed", "placed_memory_free", "device_bytes_ratio", "fits_original_share",
    "eplb", "eplb_slots"}}`` (``placed_memory_free``: the same placement with memory ignored,
    ``ceil(P / G)`` slots per device -- what the memory limit costs).
    """
    phy2log = phy2log.long()
    logcnt = torch.bincount(phy2log, minlength=load.numel()).double()
    plan_slot = None if plan_load is None else plan_load.double()[phy2log] / logcnt[phy2log]
    out = {}
    for G in device_counts:
        placed = placed_max_mean(slot_load, slot_bytes, G, original_bytes, plan_slot)
        free = place_slots(slot_load if plan_slot is None else plan_slot, slot_bytes, G, None)
        eplb = eplb_max_mean(load, phy2log.numel(), G, plan_load)
        out[int(G)] = {"contiguous": contiguous_max_mean(load, G), "placed": placed["max_mean"],
                       "placed_memory_free": max_mean(device_loads(slot_load, free, G)),
                       "device_bytes_ratio": placed["device_bytes_ratio"],
                       "fits_original_share": placed["fits_original_share"],
                       "eplb": eplb["max_mean"], "eplb_slots": eplb["slots"]}
    return out
