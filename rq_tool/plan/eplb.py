"""DeepSeek EPLB, reimplemented as rq's reference point for expert placement (pure).

Legend: L MoE layers, E logical experts, P physical slots (``num_replicas``), G GPUs
(``num_gpus``), B independent rows (problems, e.g. layers or (layer, node) pairs), M items per row.

The algorithm DeepSeek published with EPLB (github deepseek-ai/EPLB), in its four functions, in
call order, one public (``rebalance_experts``):

1. ``balanced_packing``: heaviest item first into the lightest pack with room (equal item count
   per pack);
2. ``replicate_experts``: each extra slot to the expert with the largest ``load / logcnt``;
3. ``rebalance_experts_hierarchical``: expert groups packed onto nodes (1), replicated within each
   node (2), the node's slots packed onto its GPUs (1);
4. ``rebalance_experts``: hierarchical when ``num_groups % num_nodes == 0``, otherwise steps 2-3
   on the whole cluster as one node (the "global" policy). Slot ``p`` lives on GPU
   ``p // (P / G)``.

This is a clean reimplementation from the description; its output equals the published one on
EPLB's README example (tested). rq's ``log2phy`` lists an expert's slots in increasing slot
order (EPLB lists them by replica rank; the sets are the same).
"""

from __future__ import annotations

import torch

from .predict import log2phy_from_phy2log


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack M weighted items into ``num_packs`` packs of ``M / num_packs`` items each, per row.

    Heaviest item first, into the lightest pack that still has room (ties: lowest pack id).
    ``weight [B, M]`` -> ``pack_index [B, M]`` (pack of each item), ``rank_in_pack [B, M]``
    (position of the item inside its pack, in insertion order), both int64.
    """
    weight = weight.double().cpu()
    B, M = weight.shape
    assert num_packs >= 1 and M % num_packs == 0, f"{M} items do not split evenly into {num_packs} packs"
    per_pack = M // num_packs
    pack_index = torch.empty(B, M, dtype=torch.int64)
    rank_in_pack = torch.empty(B, M, dtype=torch.int64)
    order = torch.argsort(weight, dim=-1, descending=True, stable=True)
    for n in range(B):
        load, count = [0.0] * num_packs, [0] * num_packs
        w = weight[n].tolist()
        for i in order[n].tolist():
            p = min((p for p in range(num_packs) if count[p] < per_pack), key=lambda p: (load[p], p))
            pack_index[n, i], rank_in_pack[n, i] = p, count[p]
            load[p] += w[i]
            count[p] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give M experts ``num_phy >= M`` slots: each extra slot to the argmax of ``weight / logcnt``.

    ``weight [B, M]`` -> ``phy2log [B, num_phy]`` (slots 0..M-1 are the originals, extras
    appended), ``rank [B, num_phy]`` (replica index of each slot within its expert),
    ``logcnt [B, M]``; int64.
    """
    weight = weight.double().cpu()
    B, M = weight.shape
    assert num_phy >= M, f"{num_phy} slots cannot hold {M} experts"
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(B, 1)
    rank = torch.zeros(B, num_phy, dtype=torch.int64)
    logcnt = torch.ones(B, M, dtype=torch.int64)
    rows = torch.arange(B)
    for i in range(M, num_phy):
        e = torch.argmax(weight / logcnt, dim=-1)
        phy2log[:, i] = e
        rank[:, i] = logcnt[rows, e]
        logcnt[rows, e] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of each row permutation: ``perm [B, M]`` -> ``inv [B, M]`` with ``inv[perm] = arange``."""
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(perm.shape[-1], dtype=perm.dtype).expand_as(perm))
    return inv


def rebalance_experts_hierarchical(weight: torch.Tensor, num_phy: int, num_groups: int, num_nodes: int,
                                   num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB steps 1-3: ``weight [L, E]`` -> ``phy2log [L, P]``, ``logcnt [L, E]`` (int64).

    ``E % num_groups == 0``, ``num_groups % num_nodes == 0``, ``num_gpus % num_nodes == 0`` and
    ``P % num_gpus == 0``; the returned slots are numbered GPU-major.
    """
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


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB's placement (module docstring), the public entry.

    ``weight [L, E]`` load per logical expert (normalised once here to float64 on CPU);
    ``num_replicas`` = P physical slots (a multiple of ``num_gpus``). Returns ``phy2log [L, P]``,
    ``log2phy [L, E, R]`` (-1 padded, slots of each expert in increasing order), ``logcnt [L, E]``,
    int64. Slot p is on GPU ``p // (P / num_gpus)``.
    """
    weight = weight.double().cpu()
    L, E = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, logcnt = rebalance_experts_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:  # global policy: the whole cluster as one node with one group
        phy2log, logcnt = rebalance_experts_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    maps = [log2phy_from_phy2log(phy2log[l], E) for l in range(L)]
    assert all(torch.equal(cnt, logcnt[l]) for l, (_, cnt) in enumerate(maps))
    R = max(int(logcnt.max()), 1)
    log2phy = torch.full((L, E, R), -1, dtype=torch.int64)
    for l, (l2p, _) in enumerate(maps):
        log2phy[l, :, : l2p.shape[1]] = l2p
    return phy2log, log2phy, logcnt
