"""Triton implementation of :func:`rq_tool.kernels.dispatch.replica_dispatch`.

Occurrence ranks without a sort, by counting in chunks of BLOCK_M flat pairs:

1. ``_chunk_rank_kernel`` (one program per chunk): one-hot ``[BLOCK_M, BLOCK_E]`` tiles of the
   chunk's ids; a cumulative sum down the chunk gives each pair's rank among earlier pairs of the
   same expert *inside the chunk*; the column sums give the chunk histogram ``count[c, e]``.
2. ``_expert_scan_kernel`` (one program per expert tile): exclusive scan of ``count[:, e]`` over
   chunks, in place, so ``count[c, e]`` becomes the occurrences of e before chunk c; the total
   ``n_e`` gives every replica's load ``n_e // c_e + (r < n_e % c_e)`` -> ``slot_counts``.
3. ``_slot_scan_kernel`` (one program): pad every slot's count to ``block_size``, exclusive scan
   -> each slot's start in ``sorted_ids`` and the padded total (read back once by the host to
   size the outputs; that is the only sync).
4. ``_scatter_kernel`` (one program per chunk): occurrence ``j = count[c, e] + local rank``,
   slot ``log2phy[e, j % c_e]``, destination ``slot_start + j // c_e`` (token order inside the
   slot falls out of the round-robin split), writes ``phy_ids`` and ``sorted_ids``.
5. ``_block_slot_kernel``: block b belongs to the last slot whose first block is <= b.

Every step is integer arithmetic, so the result is exactly the reference's.
"""

from __future__ import annotations

import torch

try:  # optional (CUDA, or TRITON_INTERPRET=1): a try block keeps transformers' remote-code import check
    import triton  # from demanding triton of a rewritten model loaded where only the torch paths run
    import triton.language as tl
except ImportError as e:  # pragma: no cover - imported only when the Triton backend was chosen
    raise ImportError(f"{__name__} needs triton (pip install 'rq-tool[kernels]')") from e

from .backend import interpreter_enabled
from .types import Dispatch


@triton.jit
def _chunk_rank_kernel(
    ids_ptr, local_rank_ptr, count_ptr,
    M, E,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(ids_ptr + offs, mask=offs < M, other=-1)  # -1 matches no expert
    rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for e0 in range(0, E, BLOCK_E):
        eids = e0 + tl.arange(0, BLOCK_E)
        hit = (ids[:, None] == eids[None, :]).to(tl.int32)
        seen = tl.cumsum(hit, axis=0)  # inclusive: pairs of expert e up to and including this row
        rank += tl.sum(hit * (seen - 1), axis=1)
        tl.store(count_ptr + c * E + eids, tl.sum(hit, axis=0), mask=eids < E)
    tl.store(local_rank_ptr + offs, rank, mask=offs < M)


@triton.jit
def _expert_scan_kernel(
    count_ptr, log2phy_ptr, logcnt_ptr, slot_counts_ptr,
    num_chunks, E, R, stride_log2phy_e,
    BLOCK_E: tl.constexpr,
):
    eids = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = eids < E
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c in range(num_chunks):
        v = tl.load(count_ptr + c * E + eids, mask=emask, other=0)
        tl.store(count_ptr + c * E + eids, total, mask=emask)
        total += v
    cnt = tl.load(logcnt_ptr + eids, mask=emask, other=1)
    base = total // cnt
    rem = total % cnt
    for r in range(R):
        m = emask & (r < cnt)
        slot = tl.load(log2phy_ptr + eids * stride_log2phy_e + r, mask=m, other=0)
        tl.store(slot_counts_ptr + slot, base + (r < rem).to(base.dtype), mask=m)


@triton.jit
def _slot_scan_kernel(slot_counts_ptr, slot_start_ptr, P, block_size, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    cnt = tl.load(slot_counts_ptr + offs, mask=offs < P, other=0)
    padded = (cnt + block_size - 1) // block_size * block_size
    tl.store(slot_start_ptr + offs, tl.cumsum(padded, axis=0) - padded, mask=offs < P)
    tl.store(slot_start_ptr + P, tl.sum(padded, axis=0))


@triton.jit
def _scatter_kernel(
    ids_ptr, local_rank_ptr, count_ptr, log2phy_ptr, logcnt_ptr, slot_start_ptr,
    sorted_ids_ptr, phy_ids_ptr,
    M, E, stride_log2phy_e,
    BLOCK_M: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * BLOCK_M + tl.arange(0, BLOCK_M)
    m = offs < M
    e = tl.load(ids_ptr + offs, mask=m, other=0)
    occ = tl.load(local_rank_ptr + offs, mask=m, other=0) + tl.load(count_ptr + c * E + e, mask=m, other=0)
    cnt = tl.load(logcnt_ptr + e, mask=m, other=1)
    phy = tl.load(log2phy_ptr + e * stride_log2phy_e + occ % cnt, mask=m, other=0)
    dest = tl.load(slot_start_ptr + phy, mask=m, other=0) + occ // cnt
    tl.store(sorted_ids_ptr + dest, offs, mask=m)
    tl.store(phy_ids_ptr + offs, phy, mask=m)


@triton.jit
def _block_slot_kernel(
    slot_start_ptr, block_slot_ptr,
    num_blocks, P, block_size,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    n = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        first = tl.load(slot_start_ptr + p, mask=p < P, other=0) // block_size
        started = (first[None, :] <= b[:, None]) & (p < P)[None, :]
        n += tl.sum(started.to(tl.int32), axis=1)
    tl.store(block_slot_ptr + b, n - 1, mask=b < num_blocks)


def default_tiles(M: int, E: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_E, BLOCK_B) for M pairs and E experts."""
    if interpreter_enabled():  # ~20 ms per program, tiles as numpy arrays: few, big programs
        return max(16, min(triton.next_power_of_2(M), 4096)), max(16, min(triton.next_power_of_2(E), 128)), 4096
    return 256, 32, 256


def occurrence_ranks_triton(ids, log2phy, logcnt, slot_counts, block_m: int, block_e: int):
    """Steps 1-2: ``ids [M]`` -> ``local_rank [M]`` int32 (rank inside its chunk) and ``count
    [chunks, E]`` int32 (occurrences of e before each chunk); writes round-robin ``slot_counts [P]``."""
    M, (E, R) = ids.numel(), log2phy.shape
    num_chunks = triton.cdiv(M, block_m)
    local_rank = torch.empty(M, dtype=torch.int32, device=ids.device)
    count = torch.empty(num_chunks, E, dtype=torch.int32, device=ids.device)
    _chunk_rank_kernel[(num_chunks,)](ids, local_rank, count, M, E, BLOCK_M=block_m, BLOCK_E=block_e)
    _expert_scan_kernel[(triton.cdiv(E, block_e),)](
        count, log2phy, logcnt, slot_counts, num_chunks, E, R, log2phy.stride(0), BLOCK_E=block_e
    )
    return local_rank, count


def replica_dispatch_triton(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_slots: int,
    block_size: int,
    tiles: tuple[int, int, int] | None = None,
) -> Dispatch:
    """Launches the five kernels above; inputs already checked by the public wrapper.

    ``tiles``: (BLOCK_M, BLOCK_E, BLOCK_B) powers of two, to override the defaults (tests).
    """
    dev = topk_ids.device
    T, K = topk_ids.shape
    M, E, P = T * K, log2phy.shape[0], num_slots
    slot_counts = torch.zeros(P, dtype=torch.int64, device=dev)
    if M == 0:
        empty = torch.empty(0, dtype=torch.int64, device=dev)
        return Dispatch(torch.empty(T, K, dtype=torch.int64, device=dev), slot_counts, empty, empty, 0, block_size)
    ids = topk_ids.reshape(-1).contiguous()
    log2phy, logcnt = log2phy.contiguous(), logcnt.contiguous()
    block_m, block_e, block_b = tiles if tiles is not None else default_tiles(M, E)
    local_rank, count = occurrence_ranks_triton(ids, log2phy, logcnt, slot_counts, block_m, block_e)
    slot_start = torch.empty(P + 1, dtype=torch.int64, device=dev)
    _slot_scan_kernel[(1,)](slot_counts, slot_start, P, block_size, BLOCK_P=max(16, triton.next_power_of_2(P)))
    num_padded = int(slot_start[P])  # host sync: output sizes depend on it

    sorted_ids = torch.full((num_padded,), M, dtype=torch.int64, device=dev)
    phy_ids = torch.empty(T, K, dtype=torch.int64, device=dev)
    _scatter_kernel[(count.shape[0],)](
        ids, local_rank, count, log2phy, logcnt, slot_start, sorted_ids, phy_ids, M, E, log2phy.stride(0),
        BLOCK_M=block_m,
    )
    num_blocks = num_padded // block_size
    block_slot = torch.empty(num_blocks, dtype=torch.int64, device=dev)
    _block_slot_kernel[(triton.cdiv(num_blocks, block_b),)](
        slot_start, block_slot, num_blocks, P, block_size,
        BLOCK_B=block_b, BLOCK_P=max(16, min(triton.next_power_of_2(P), 64)),
    )
    return Dispatch(phy_ids, slot_counts, sorted_ids, block_slot, num_padded, block_size)
