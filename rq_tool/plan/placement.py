"""Device placement for expert parallelism: rq's own placement of planned slots on G devices.

Legend: E logical experts, P physical slots, G devices.

rq plans the slots of a layer (``rq_tool.plan.make_plan``); ``place_slots`` then puts those
slots on G devices: heaviest slot first, onto the least-loaded device that still has room
(memory capacity, or an equal share ``ceil(P / G)`` of slots when no capacity is given): longest
processing time first, a classic heuristic (without the room limits its max load is within 4/3
of the optimum), then refined by local search. ``device_loads`` and ``max_mean`` score a
placement. The reference point, DeepSeek EPLB, lives in ``rq_tool.plan.eplb``.
"""

from __future__ import annotations

import math

import torch

from ..errors import RQError

def _greedy_place(order, load, nbytes, G: int, max_count: int, capacity: int | None, best_fit: bool):
    dev_load, dev_bytes, dev_count = [0.0] * G, [0] * G, [0] * G
    out = [-1] * len(load)
    for i in order:
        fits = [g for g in range(G)
                if dev_count[g] < max_count and (capacity is None or dev_bytes[g] + nbytes[i] <= capacity)]
        if not fits:
            return None
        if best_fit:  # memory first: the fullest device the slot still fits on
            g = min(fits, key=lambda g: (-dev_bytes[g], dev_load[g], g))
        else:
            g = min(fits, key=lambda g: (dev_load[g], dev_count[g], g))
        out[i] = g
        dev_load[g] += load[i]
        dev_bytes[g] += nbytes[i]
        dev_count[g] += 1
    return out


def _refine(out, load, nbytes, G: int, max_count: int, capacity: int | None, rounds: int = 200):
    """Local search on a feasible placement: move or swap a slot of the busiest device while that
    lowers the larger of the two devices' loads and keeps both within memory and count limits."""
    dev_load, dev_bytes, dev_count = [0.0] * G, [0] * G, [0] * G
    for i, g in enumerate(out):
        dev_load[g] += load[i]
        dev_bytes[g] += nbytes[i]
        dev_count[g] += 1
    cap = float("inf") if capacity is None else capacity
    for _ in range(rounds):
        hi = max(range(G), key=lambda g: dev_load[g])
        best = None  # (new pair max, kind, i, j, g)
        mine = [i for i, g in enumerate(out) if g == hi]
        for g in range(G):
            if g == hi:
                continue
            for i in mine:
                if dev_count[g] < max_count and dev_bytes[g] + nbytes[i] <= cap:  # move i -> g
                    m = max(dev_load[hi] - load[i], dev_load[g] + load[i])
                    if m < dev_load[hi] - 1e-12 and (best is None or m < best[0]):
                        best = (m, "move", i, None, g)
                for j in (j for j, h in enumerate(out) if h == g):  # swap i <-> j
                    d = load[i] - load[j]
                    if d <= 0 or dev_bytes[g] - nbytes[j] + nbytes[i] > cap or dev_bytes[hi] - nbytes[i] + nbytes[j] > cap:
                        continue
                    m = max(dev_load[hi] - d, dev_load[g] + d)
                    if m < dev_load[hi] - 1e-12 and (best is None or m < best[0]):
                        best = (m, "swap", i, j, g)
        if best is None:
            break
        _, kind, i, j, g = best
        out[i] = g
        dev_load[hi] -= load[i]; dev_load[g] += load[i]  # noqa: E702
        dev_bytes[hi] -= nbytes[i]; dev_bytes[g] += nbytes[i]  # noqa: E702
        if kind == "swap":
            out[j] = hi
            dev_load[hi] += load[j]; dev_load[g] -= load[j]  # noqa: E702
            dev_bytes[hi] += nbytes[j]; dev_bytes[g] -= nbytes[j]  # noqa: E702
        else:
            dev_count[hi] -= 1; dev_count[g] += 1  # noqa: E702
    return out


def place_slots(slot_load: torch.Tensor, slot_bytes: torch.Tensor, num_devices: int,
                capacity_bytes: int | None = None) -> torch.Tensor:
    """Assign P slots to G devices, balancing load: ``slot_load [P]``, ``slot_bytes [P]`` -> ``[P]`` int64.

    Heaviest slot first (ties: more bytes, then lower slot id), onto the least-loaded device that
    has room (ties: fewer slots, then lower device id). Room is ``capacity_bytes`` per device when
    given, else ``ceil(P / G)`` slots per device. If balancing first cannot fit the slots in the
    capacity, a memory-first pass (largest slot first, best fit) is tried before raising
    ``RQError``. Either result is then refined by local search (moves and swaps off the busiest
    device that lower its load within the limits), so a memory-first fallback is balanced too.
    """
    load = slot_load.double().cpu().tolist()
    nbytes = [int(b) for b in torch.as_tensor(slot_bytes, dtype=torch.int64).cpu().tolist()]
    P, G = len(load), int(num_devices)
    assert len(nbytes) == P and G >= 1
    max_count = math.ceil(P / G) if capacity_bytes is None else P
    by_load = sorted(range(P), key=lambda i: (-load[i], -nbytes[i], i))
    out = _greedy_place(by_load, load, nbytes, G, max_count, capacity_bytes, best_fit=False)
    if out is None:
        by_bytes = sorted(range(P), key=lambda i: (-nbytes[i], -load[i], i))
        out = _greedy_place(by_bytes, load, nbytes, G, max_count, capacity_bytes, best_fit=True)
    if out is not None:
        out = _refine(out, load, nbytes, G, max_count, capacity_bytes)
    if out is None:
        raise RQError(f"cannot place {P} slots ({sum(nbytes)} bytes) on {G} devices of {capacity_bytes} bytes each",
                      hint="add devices, raise the capacity, or plan with a smaller budget")
    return torch.tensor(out, dtype=torch.int64)


def device_loads(slot_load: torch.Tensor, device_of_slot: torch.Tensor, num_devices: int) -> torch.Tensor:
    """``slot_load [P]``, ``device_of_slot [P]`` -> load per device ``[G]`` float64."""
    return torch.zeros(num_devices, dtype=torch.float64).index_add_(0, device_of_slot.long(), slot_load.double())


def max_mean(x: torch.Tensor) -> float:
    """``x [G]`` -> max / mean (1.0 = balanced; 1.0 when everything is zero)."""
    x = x.double()
    mean = float(x.mean()) if x.numel() else 0.0
    return 1.0 if mean <= 0 else float(x.max()) / mean
