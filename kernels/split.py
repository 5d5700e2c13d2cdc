"""Replica split policies: how many of a logical expert's routed pairs each of its slots takes.

Legend: B independent rows (steps, or steps x layers), E logical experts, R max replicas,
P physical slots, G devices.

Two policies, both pure functions from per-step expert counts to per-slot counts:

- ``round-robin``: replica r of expert e (c = logcnt[e] copies, n = count) takes
  ``n // c + (r < n % c)``: the split of ``replica_dispatch``'s round-robin-by-occurrence rule.
- ``load-aware``: water-filling. Experts with one slot are fixed on their device; each replicated
  expert (heaviest first, ties by lower id) pours its n pairs over the devices that hold its
  replicas, lowest device first, so that the busiest of those devices ends as light as possible;
  up to ``_ROUNDS`` Gauss-Seidel rounds (stopping at a fixed point) then take each replicated expert out and pour it again given all the
  others. Within a device the expert's share is split evenly over its slots there (lower slot
  first). Integer, deterministic, ``sum`` over an expert's slots equals its count exactly.

The per-token slot for a split is :func:`assign_slots`: the j-th occurrence (flat ``t*K + k``
order) of expert e goes to the replica whose cumulative quota first exceeds j, so slot r of e
takes occurrences ``[cum[r-1], cum[r])``; this keeps token order inside every slot.
"""

from __future__ import annotations

import torch

SPLIT_POLICIES = ("round-robin", "load-aware")
_ROUNDS = 12  # Gauss-Seidel passes after the first pour (stops early at a fixed point); chain layouts
# (replicated experts linked device to device) converge slowly: Zipf s=1 E=64 G=64 on the McNaughton-wrap
# fill (level 1.004) is 1.064 after 12 rounds, 1.003 after 200; the planner's star fill is 1.007 after 12


def round_robin_split(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``counts [B, E]`` int64 -> ``slot_counts [B, P]`` int64 (round-robin by occurrence)."""
    B, E = counts.shape
    R = log2phy.shape[1]
    r = torch.arange(R, device=counts.device)
    c = logcnt.clamp(min=1)
    share = counts.unsqueeze(-1) // c.view(1, E, 1) + (r.view(1, 1, R) < (counts % c).unsqueeze(-1)).long()
    valid = (r.view(1, R) < logcnt.view(E, 1)).expand(B, E, R)
    out = torch.zeros(B, num_slots, dtype=torch.int64, device=counts.device)
    idx = log2phy.clamp(min=0).expand(B, E, R)
    out.scatter_add_(1, idx[valid].view(B, -1), share[valid].view(B, -1))
    return out


def _pour(level_base: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Integer water-filling. ``level_base [B, D]`` current loads of the D bins, ``amount [B]``
    -> ``add [B, D]`` (>= 0, rows sum to ``amount``) minimising ``max(level_base + add)`` over the
    bins that receive anything; leftover units go to the lowest bins (ties: lower bin index)."""
    B, D = level_base.shape
    v, order = torch.sort(level_base, dim=1, stable=True)
    csum = torch.cumsum(v, dim=1)
    k = torch.arange(1, D + 1, device=v.device).view(1, D)
    # candidate level if the k lowest bins are filled: (amount + sum of their loads) / k
    h = (amount.view(B, 1) + csum).double() / k
    # the number of bins filled is the largest k with v[k-1] < h_k (always true for k = 1)
    fill = (v.double() < h).long()
    kstar = fill.cumprod(dim=1).sum(dim=1).clamp(min=1)  # prefix property: once false, stays false
    sel = torch.gather(csum, 1, (kstar - 1).view(B, 1)).squeeze(1)
    level = (amount + sel) // kstar  # floor of the water level
    inside = k <= kstar.view(B, 1)
    add_sorted = torch.where(inside, (level.view(B, 1) - v).clamp(min=0), torch.zeros_like(v))
    rest = amount - add_sorted.sum(dim=1)
    # after the floor fill, bins inside sit at `level`; the `rest` (< kstar) lowest of them get +1
    add_sorted = add_sorted + ((k <= rest.view(B, 1)) & inside).long()
    add = torch.empty_like(add_sorted)
    add.scatter_(1, order, add_sorted)
    return add


def load_aware_split(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                     slot_device: torch.Tensor, num_devices: int, rounds: int = _ROUNDS) -> torch.Tensor:
    """``counts [B, E]`` int64 pairs per logical expert per row, ``log2phy [E, R]`` (-1 padded),
    ``logcnt [E]``, ``slot_device [P]`` device of each slot in [0, G) -> ``slot_counts [B, P]`` int64.

    See the module docstring for the rule. Rows are independent; the expert order (heaviest first)
    is taken from the column sums so one pass serves every row.
    """
    assert counts.dim() == 2 and log2phy.dim() == 2 and logcnt.shape == (log2phy.shape[0],)
    counts = counts.long()
    B, E = counts.shape
    P = slot_device.numel()
    dev = counts.device
    slot_device = slot_device.long().to(dev)
    out = torch.zeros(B, P, dtype=torch.int64, device=dev)
    load = torch.zeros(B, num_devices, dtype=torch.int64, device=dev)
    single = (logcnt == 1).nonzero().flatten()
    if single.numel():
        s_slot = log2phy[single, 0]
        out[:, s_slot] = counts[:, single]
        load.scatter_add_(1, slot_device[s_slot].view(1, -1).expand(B, -1), counts[:, single])
    multi = (logcnt > 1).nonzero().flatten()
    if multi.numel() == 0:
        return out
    order = multi[torch.argsort(counts[:, multi].sum(0), descending=True, stable=True)].tolist()
    plans = []
    for e in order:
        slots = log2phy[e, : int(logcnt[e])]
        devs, inv = torch.unique(slot_device[slots], return_inverse=True)
        plans.append((e, slots, devs, inv))
    share = {}
    for it in range(1 + rounds):
        changed = False
        for e, slots, devs, inv in plans:
            if it:  # take the expert out before pouring it again
                load.scatter_add_(1, devs.view(1, -1).expand(B, -1), -share[e])
            add = _pour(load[:, devs], counts[:, e])
            changed = changed or not it or not torch.equal(add, share[e])
            share[e] = add
            load.scatter_add_(1, devs.view(1, -1).expand(B, -1), add)
        if not changed:  # a fixed point: further passes change nothing
            break
    for e, slots, devs, inv in plans:
        add = share[e]
        # split each device's share evenly over the expert's slots on that device, lower slot first
        per_dev = torch.bincount(inv, minlength=devs.numel())  # slots of e on each device
        rank = torch.zeros_like(inv)
        for d in range(devs.numel()):
            where = (inv == d).nonzero().flatten()
            rank[where] = torch.arange(where.numel(), device=dev)
        n = add[:, inv]  # [B, c] the device share seen by each slot
        m = per_dev[inv].view(1, -1)
        out[:, slots] = n // m + (rank.view(1, -1) < (n % m)).long()
    return out


def split_counts(policy: str, counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                 slot_device: torch.Tensor | None = None, num_devices: int | None = None) -> torch.Tensor:
    """Dispatch on ``policy`` (one of ``SPLIT_POLICIES``); ``counts [B, E]`` -> ``[B, P]``.
    ``load-aware`` needs ``slot_device [P]`` and ``num_devices``; P = ``slot_device.numel()``
    (round-robin: P = 1 + max slot id in ``log2phy``, or ``slot_device.numel()`` when given)."""
    if policy == "round-robin":
        P = slot_device.numel() if slot_device is not None else int(log2phy.max()) + 1
        return round_robin_split(counts, log2phy, logcnt, P)
    if policy == "load-aware":
        assert slot_device is not None and num_devices is not None, "load-aware split needs slot_device and num_devices"
        return load_aware_split(counts, log2phy, logcnt, slot_device, num_devices)
    raise ValueError(f"unknown split policy {policy!r}; choose one of {', '.join(SPLIT_POLICIES)}")


def occurrence_ranks(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``flat [N]`` logical ids -> ``occ [N]`` int64: how many earlier pairs (flat order) have the same id."""
    order = torch.sort(flat, stable=True).indices
    e_count = torch.bincount(flat, minlength=num_experts)
    e_start = torch.cumsum(e_count, 0) - e_count
    occ = torch.empty_like(flat)
    occ[order] = torch.arange(flat.numel(), device=flat.device) - e_start[flat[order]]
    return occ


def assign_slots(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, slot_counts: torch.Tensor) -> torch.Tensor:
    """``topk_ids [T, K]`` logical ids, ``slot_counts [P]`` a split of this step's counts (each
    expert's slots sum to its occurrences) -> ``phy_ids [T, K]`` int64 (see module docstring)."""
    flat = topk_ids.reshape(-1).long()
    occ = occurrence_ranks(flat, log2phy.shape[0])
    quota = torch.where(log2phy >= 0, slot_counts[log2phy.clamp(min=0)], torch.zeros_like(log2phy))  # [E, R]
    cum = torch.cumsum(quota, dim=1)  # [E, R]
    r = torch.searchsorted(cum[flat], occ.view(-1, 1), right=True).squeeze(1)
    r = torch.minimum(r, (logcnt[flat] - 1).clamp(min=0))
    return log2phy[flat, r].view(topk_ids.shape)
