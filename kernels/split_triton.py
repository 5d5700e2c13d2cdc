"""Triton implementation of the replica split policies and the per-token slot assignment.

References (same contracts, exact index equality): ``kernels.split.load_aware_split``,
``round_robin_split`` and ``assign_slots``. Legend: B rows (steps), E logical experts, R max
replicas, P physical slots, G devices, T tokens, K top-k, M = T*K.

``_load_aware_split_kernel`` (one program per row) keeps everything in registers: the device
loads ``[G]``, the experts' device sets ``[E, G]`` and their current shares ``[E, G]``. Experts
with one slot are poured first (fixed); the replicated ones follow heaviest first (their rank by
pairwise comparison of the column sums, ties by lower id, as the reference's stable sort), and
each is water-filled over its devices:

- bins = the devices holding a replica, ranked by (load, device id) by pairwise comparison (the
  reference's stable sort), their sorted loads ``v`` and prefix sums ``c`` by one-hot sums;
- the number of bins filled is the longest prefix with ``k * v[k-1] < amount + c[k-1]`` (the
  reference compares ``v < (amount + c) / k`` in float64, identical for counts below 2**50);
- level ``(amount + c[k*-1]) // k*``, the ``rest`` lowest filled bins get one more.

Then ``ROUNDS`` Gauss-Seidel passes (the reference stops early at a fixed point, where further
passes are no-ops, so always running them gives the same result) take each replicated expert out
and pour it again; each device's share is split evenly over the expert's slots there (lower
replica first). Integers throughout (int64), so the result is exactly the reference's.

``assign_slots_triton`` reuses the occurrence-rank kernels of ``dispatch_triton`` (chunk ranks +
per-expert scan) and picks, per pair, the replica whose cumulative quota first exceeds its
occurrence (``searchsorted(right=True)`` as a count over R).
"""

from __future__ import annotations

import torch

try:  # optional (CUDA, or TRITON_INTERPRET=1): a try block keeps transformers' remote-code import check
    import triton  # from demanding triton of a rewritten model loaded where only the torch paths run
    import triton.language as tl
except ImportError as e:  # pragma: no cover - imported only when the Triton backend was chosen
    raise ImportError(f"{__name__} needs triton (pip install 'rq-tool[kernels]')") from e

from .backend import interpreter_enabled
from .dispatch_triton import default_tiles, occurrence_ranks_triton
from .split import _ROUNDS



@triton.jit
def _pour(v, inset, amount, BLOCK_G: tl.constexpr):
    """``v [BLOCK_G]`` device loads, ``inset [BLOCK_G]`` the bins, ``amount`` -> ``add [BLOCK_G]``."""
    g = tl.arange(0, BLOCK_G)
    D = tl.sum(inset.to(tl.int64), axis=0)
    # stable rank of each bin among the bins: lower load first, then lower device id
    before = inset[None, :] & ((v[None, :] < v[:, None]) | ((v[None, :] == v[:, None]) & (g[None, :] < g[:, None])))
    rank = tl.sum(before.to(tl.int64), axis=1)  # [BLOCK_G], meaningful where inset
    # sorted view: position p (rows) <- bin g (columns)
    at = inset[None, :] & (rank[None, :] == g[:, None])
    upto = inset[None, :] & (rank[None, :] <= g[:, None])
    vs = tl.sum(tl.where(at, v[None, :], 0), axis=1)
    cs = tl.sum(tl.where(upto, v[None, :], 0), axis=1)
    cond = (vs * (g + 1)) < (amount + cs)
    kstar = tl.min(tl.where((g < D) & (cond == 0), g, D), axis=0)
    kstar = tl.maximum(kstar, 1)
    sel = tl.sum(tl.where(g == kstar - 1, cs, 0), axis=0)
    level = (amount + sel) // kstar
    inside = inset & (rank < kstar)
    add = tl.where(inside, tl.maximum(level - v, 0), 0)
    rest = amount - tl.sum(add, axis=0)
    return add + (inside & (rank < rest)).to(tl.int64)


@triton.jit
def _load_aware_split_kernel(
    counts_ptr, log2phy_ptr, logcnt_ptr, slot_device_ptr, out_ptr,
    B, E, R, P, G,
    ROUNDS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
):
    b = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    g = tl.arange(0, BLOCK_G)
    emask = e < E
    cnt = tl.load(counts_ptr + b * E + e, mask=emask, other=0).to(tl.int64)
    lc = tl.load(logcnt_ptr + e, mask=emask, other=0)
    # experts with one slot: fixed on their device
    single = emask & (lc == 1)
    s0 = tl.load(log2phy_ptr + e * R, mask=single, other=0)
    d0 = tl.load(slot_device_ptr + s0, mask=single, other=-1)
    load = tl.sum(tl.where(single[:, None] & (d0[:, None] == g[None, :]), cnt[:, None], 0), axis=0)
    tl.store(out_ptr + b * P + s0, cnt, mask=single)
    # device set of every expert
    has = tl.zeros((BLOCK_E, BLOCK_G), dtype=tl.int32)
    for r in range(R):
        valid = emask & (r < lc)
        s = tl.load(log2phy_ptr + e * R + r, mask=valid, other=0)
        d = tl.load(slot_device_ptr + s, mask=valid, other=-1)
        has = tl.maximum(has, (valid[:, None] & (d[:, None] == g[None, :])).to(tl.int32))
    # replicated experts heaviest first over all rows (column sums), ties by lower id
    multi = emask & (lc > 1)
    tot = tl.zeros((BLOCK_E,), dtype=tl.int64)
    for bb in range(B):
        tot += tl.load(counts_ptr + bb * E + e, mask=emask, other=0).to(tl.int64)
    ahead = multi[None, :] & ((tot[None, :] > tot[:, None]) | ((tot[None, :] == tot[:, None]) & (e[None, :] < e[:, None])))
    order = tl.sum(ahead.to(tl.int32), axis=1)
    num_multi = tl.sum(multi.to(tl.int32), axis=0)
    share = tl.zeros((BLOCK_E, BLOCK_G), dtype=tl.int64)
    for it in range(1 + ROUNDS):
        for i in range(num_multi):
            pick = multi & (order == i)
            amount = tl.sum(tl.where(pick, cnt, 0), axis=0)
            inset = tl.max(tl.where(pick[:, None], has, 0), axis=0) > 0
            old = tl.sum(tl.where(pick[:, None], share, 0), axis=0)
            load = load - old  # zero on the first pass
            add = _pour(load, inset, amount, BLOCK_G)
            share = tl.where(pick[:, None], add[None, :], share)
            load = load + add
    # each device's share split evenly over the expert's slots on it, lower replica first
    for r in range(R):
        valid = multi & (r < lc)
        s = tl.load(log2phy_ptr + e * R + r, mask=valid, other=0)
        d = tl.load(slot_device_ptr + s, mask=valid, other=-1)
        n = tl.sum(tl.where(d[:, None] == g[None, :], share, 0), axis=1)
        m = tl.zeros((BLOCK_E,), dtype=tl.int64)  # the expert's slots on device d
        rk = tl.zeros((BLOCK_E,), dtype=tl.int64)  # ... of them before replica r
        for q in range(R):
            vq = valid & (q < lc)
            sq = tl.load(log2phy_ptr + e * R + q, mask=vq, other=0)
            dq = tl.load(slot_device_ptr + sq, mask=vq, other=-2)
            m += (vq & (dq == d)).to(tl.int64)
        for q in range(r):
            sq = tl.load(log2phy_ptr + e * R + q, mask=valid, other=0)
            dq = tl.load(slot_device_ptr + sq, mask=valid, other=-2)
            rk += (valid & (dq == d)).to(tl.int64)
        m = tl.maximum(m, 1)
        tl.store(out_ptr + b * P + s, n // m + (rk < n % m).to(tl.int64), mask=valid)


@triton.jit
def _round_robin_split_kernel(
    counts_ptr, log2phy_ptr, logcnt_ptr, out_ptr,
    E, R, P,
    BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < E
    n = tl.load(counts_ptr + b * E + e, mask=emask, other=0).to(tl.int64)
    c = tl.maximum(tl.load(logcnt_ptr + e, mask=emask, other=1), 1)
    for r in range(R):
        valid = emask & (r < c)
        s = tl.load(log2phy_ptr + e * R + r, mask=valid, other=0)
        tl.store(out_ptr + b * P + s, n // c + (r < n % c).to(tl.int64), mask=valid)


@triton.jit
def _assign_kernel(
    ids_ptr, local_rank_ptr, count_ptr, log2phy_ptr, logcnt_ptr, slot_counts_ptr, phy_ids_ptr,
    N, E, R,
    BLOCK_N: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    e = tl.load(ids_ptr + offs, mask=m, other=0)
    occ = (tl.load(local_rank_ptr + offs, mask=m, other=0) + tl.load(count_ptr + c * E + e, mask=m, other=0)).to(tl.int64)
    cum = tl.zeros((BLOCK_N,), dtype=tl.int64)
    r_sel = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for r in range(R):
        s = tl.load(log2phy_ptr + e * R + r, mask=m, other=-1)
        cum += tl.load(slot_counts_ptr + s, mask=m & (s >= 0), other=0)
        r_sel += (cum <= occ).to(tl.int64)
    lc = tl.load(logcnt_ptr + e, mask=m, other=1)
    r_sel = tl.minimum(r_sel, tl.maximum(lc - 1, 0))
    tl.store(phy_ids_ptr + offs, tl.load(log2phy_ptr + e * R + r_sel, mask=m, other=0), mask=m)


def _check_maps(log2phy: torch.Tensor, logcnt: torch.Tensor):
    assert log2phy.dim() == 2 and logcnt.shape == (log2phy.shape[0],), "log2phy [E, R], logcnt [E]"
    assert log2phy.dtype == torch.int64 and logcnt.dtype == torch.int64


def load_aware_split_triton(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                            slot_device: torch.Tensor, num_devices: int, rounds: int = _ROUNDS) -> torch.Tensor:
    """``counts [B, E]`` -> ``slot_counts [B, P]`` int64, exactly ``split.load_aware_split`` with the
    same ``rounds``. The kernel always runs all ``rounds`` Gauss-Seidel passes (``ROUNDS`` is a
    constexpr: one compile per value); the reference stops at a fixed point, after which a pass
    changes nothing, so both give the same slots."""
    _check_maps(log2phy, logcnt)
    assert rounds >= 0, rounds
    assert counts.dim() == 2 and counts.shape[1] == log2phy.shape[0]
    B, E = counts.shape
    P, R = slot_device.numel(), log2phy.shape[1]
    out = torch.zeros(B, P, dtype=torch.int64, device=counts.device)
    if B == 0:
        return out
    _load_aware_split_kernel[(B,)](
        counts.long().contiguous(), log2phy.contiguous(), logcnt.contiguous(), slot_device.long().contiguous(), out,
        B, E, R, P, int(num_devices),
        ROUNDS=int(rounds), BLOCK_E=max(16, triton.next_power_of_2(E)), BLOCK_G=max(16, triton.next_power_of_2(num_devices)),
    )
    return out


def round_robin_split_triton(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                             num_slots: int) -> torch.Tensor:
    """``counts [B, E]`` -> ``slot_counts [B, P]`` int64, exactly ``split.round_robin_split``."""
    _check_maps(log2phy, logcnt)
    B, E = counts.shape
    out = torch.zeros(B, num_slots, dtype=torch.int64, device=counts.device)
    block_e = max(16, min(triton.next_power_of_2(E), 1024 if interpreter_enabled() else 128))
    if B:
        _round_robin_split_kernel[(B, triton.cdiv(E, block_e))](
            counts.long().contiguous(), log2phy.contiguous(), logcnt.contiguous(), out, E, log2phy.shape[1], num_slots,
            BLOCK_E=block_e,
        )
    return out


def assign_slots_triton(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                        slot_counts: torch.Tensor) -> torch.Tensor:
    """``topk_ids [T, K]``, ``slot_counts [P]`` -> ``phy_ids [T, K]`` int64, exactly ``split.assign_slots``."""
    _check_maps(log2phy, logcnt)
    T, K = topk_ids.shape
    N, (E, R) = T * K, log2phy.shape
    dev = topk_ids.device
    phy_ids = torch.empty(T, K, dtype=torch.int64, device=dev)
    if N == 0:
        return phy_ids
    ids = topk_ids.reshape(-1).long().contiguous()
    log2phy, logcnt = log2phy.contiguous(), logcnt.contiguous()
    block_n, block_e, _ = default_tiles(N, E)
    scratch = torch.zeros(slot_counts.numel(), dtype=torch.int64, device=dev)  # the scan's round-robin counts, unused
    local_rank, count = occurrence_ranks_triton(ids, log2phy, logcnt, scratch, block_n, block_e)
    _assign_kernel[(count.shape[0],)](
        ids, local_rank, count, log2phy, logcnt, slot_counts.long().contiguous(), phy_ids, N, E, R, BLOCK_N=block_n
    )
    return phy_ids
