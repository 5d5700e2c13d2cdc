"""Device placement for expert parallelism, and DeepSeek EPLB reimplemented as the reference.

Legend: L MoE layers, E logical experts, P physical slots, G devices, N rows (independent
problems, e.g. layers), M items per row.

rq plans the slots of a layer (``rq_tool.plan.make_plan``); ``place_slots`` then puts those
slots on G devices: heaviest slot first, onto the least-loaded device that still has room
(memory capacity, or an equal share ``ceil(P / G)`` of slots when no capacity is given): longest
processing time first, a classic heuristic (without the room limits its max load is within 4/3
of the optimum).

``eplb_rebalance`` follows the algorithm DeepSeek published with EPLB (github deepseek-ai/EPLB):
1. expert groups are packed onto nodes (balanced, equal group count per node),
2. within each node, each extra slot goes to the expert with the largest ``load / logcnt``,
3. the node's slots are packed onto its GPUs (balanced, equal slot count per GPU).
It is hierarchical when ``num_groups % num_nodes == 0``, otherwise steps 2-3 run on the whole
cluster as one node. Slot ``p`` lives on GPU ``p // (P / num_gpus)``. This is a clean
reimplementation from the description; rq's ``log2phy`` lists an expert's slots in increasing
slot order (EPLB lists them by replica rank; the sets are the same).
"""

from __future__ import annotations

import math

import torch

from ..errors import RQError
from .predict import log2phy_from_phy2log


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack M weighted items into ``num_packs`` packs of ``M / num_packs`` items each, per row.

    Heaviest item first, into the lightest pack that still has room (ties: lowest pack id).
    ``weight [N, M]`` -> ``pack_index [N, M]`` (pack of each item), ``rank_in_pack [N, M]``
    (position of the item inside its pack, in insertion order), both int64.
    """
    weight = weight.double().cpu()
    N, M = weight.shape
    assert num_packs >= 1 and M % num_packs == 0, f"{M} items do not split evenly into {num_packs} packs"
    per_pack = M // num_packs
    pack_index = torch.empty(N, M, dtype=torch.int64)
    rank_in_pack = torch.empty(N, M, dtype=torch.int64)
    order = torch.argsort(weight, dim=-1, descending=True, stable=True)
    for n in range(N):
        load, count = [0.0] * num_packs, [0] * num_packs
        w = weight[n].tolist()
        for i in order[n].tolist():
            p = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
            pack_index[n, i], rank_in_pack[n, i] = p, count[p]
            load[p] += w[i]
            count[p] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give E experts ``num_phy >= E`` slots: each extra slot to the argmax of ``weight / logcnt``.

    ``weight [N, E]`` -> ``phy2log [N, num_phy]`` (slots 0..E-1 are the originals, extras appended),
    ``rank [N, num_phy]`` (replica index of each slot within its expert), ``logcnt [N, E]``; int64.
    """
    weight = weight.double().cpu()
    N, E = weight.shape
    assert num_phy >= E, f"{num_phy} slots cannot hold {E} experts"
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(N, 1)
    rank = torch.zeros(N, num_phy, dtype=torch.int64)
    logcnt = torch.ones(N, E, dtype=torch.int64)
    rows = torch.arange(N)
    for i in range(E, num_phy):
        e = torch.argmax(weight / logcnt, dim=-1)
        phy2log[:, i] = e
        rank[:, i] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of each row permutation: ``perm [N, M]`` -> ``inv [N, M]`` with ``inv[perm] = arange``."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], dtype=perm.dtype).expand_as(perm))
    return inv


def _hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB steps 1-3. ``weight [L, E]`` -> ``phy2log [L, num_phy]``, ``logcnt [L, E]``."""
    L, E = weight.shape
    assert E % num_groups == 0 and num_groups % num_nodes == 0
    assert num_gpus % num_nodes == 0 and num_phy % num_gpus == 0
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    experts_per_node, phy_per_node = E // num_nodes, num_phy // num_nodes
    phy_per_gpu = num_phy // num_gpus

    # 1. groups -> nodes. "mlog" numbers experts node-major: node, group slot in node, offset.
    group_pack, group_rank = balanced_packing(weight.view(L, num_groups, group_size).sum(-1), num_nodes)
    group_pos = group_pack * groups_per_node + group_rank  # [L, num_groups]
    log2mlog = (group_pos[:, :, None] * group_size + torch.arange(group_size)).view(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. replicate within each node: rows are (layer, node)
    mlog_weight = weight.gather(-1, mlog2log).view(L * num_nodes, experts_per_node)
    phy2mlog, _, mlogcnt = replicate_experts(mlog_weight, phy_per_node)

    # 3. a node's slots -> its GPUs; "pphy" numbers slots GPU-major within the node
    phy_weight = (mlog_weight / mlogcnt).gather(-1, phy2mlog)
    gpu, rank = balanced_packing(phy_weight, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * phy_per_gpu + rank)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(L, num_nodes, phy_per_node)
    pphy2mlog = (pphy2mlog + (torch.arange(num_nodes) * experts_per_node)[None, :, None]).view(L, num_phy)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    logcnt = mlogcnt.view(L, E).gather(-1, log2mlog)
    return phy2log, logcnt


def eplb_rebalance(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                   num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB's placement (see the module docstring), the reference point for rq.

    ``weight [L, E]`` load per logical expert; ``num_replicas`` = P physical slots (a multiple of
    ``num_gpus``); returns ``phy2log [L, P]``, ``log2phy [L, E, R]`` (-1 padded, slots of each
    expert in increasing order), ``logcnt [L, E]``, int64. Slot p is on GPU ``p // (P / num_gpus)``.
    """
    weight = weight.double().cpu()
    L, E = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, logcnt = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, logcnt = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maps = [log2phy_from_phy2log(phy2log[l], E) for l in range(L)]
    assert all(torch.equal(cnt, logcnt[l]) for l, (_, cnt) in enumerate(maps))
    R = max(int(logcnt.max()), 1)
    log2phy = torch.full((L, E, R), -1, dtype=torch.int64)
    for l, (l2p, _) in enumerate(maps):
        log2phy[l, :, : l2p.shape[1]] = l2p
    return phy2log, log2phy, logcnt


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
