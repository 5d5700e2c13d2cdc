"""Replica-aware dispatch: logical top-k ids -> physical slots, grouped into padded blocks.

Legend: T tokens, K top-k, E logical experts, R max replicas, P physical slots, M = T*K.

Split policy "round-robin-by-occurrence": flatten ``topk_ids [T, K]`` row-major; the j-th
occurrence (0-based, in that flat order) of logical expert e goes to ``log2phy[e, j % logcnt[e]]``.
So replica r of e receives occurrences r, r + c, r + 2c, ... (c = logcnt[e]): its load is
``n_e // c + (r < n_e % c)`` and the occurrence j sits at position ``j // c`` of its slot, which
keeps token order inside every slot without a second sort.

The grouped output follows vLLM's ``moe_align_block_size``: ``sorted_ids`` lists flat indices
``t*K + k`` slot by slot (ascending slot, original order inside a slot), each slot's segment padded
with the sentinel M up to a multiple of ``block_size``; ``block_slot`` gives each block's slot
(worked example: :class:`rq_tool.kernels.types.Dispatch`).
"""

from __future__ import annotations

import torch

from .backend import resolve_impl, triton_import_failed
from .split import occurrence_ranks
from .types import Dispatch


def _check(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_slots: int, block_size: int):
    assert topk_ids.dim() == 2, f"topk_ids must be [T, K], got {tuple(topk_ids.shape)}"
    assert log2phy.dim() == 2 and logcnt.shape == (log2phy.shape[0],), (
        f"log2phy must be [E, R] and logcnt [E]; got {tuple(log2phy.shape)} and {tuple(logcnt.shape)}"
    )
    assert not topk_ids.is_floating_point() and log2phy.dtype == torch.int64 and logcnt.dtype == torch.int64
    assert topk_ids.device == log2phy.device == logcnt.device, "topk_ids, log2phy, logcnt on different devices"
    assert num_slots >= 1 and block_size >= 1


def replica_dispatch_reference(
    topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_slots: int, block_size: int = 64
) -> Dispatch:
    """Pure-torch dispatch (see module docstring); same contract as :func:`replica_dispatch`."""
    _check(topk_ids, log2phy, logcnt, num_slots, block_size)
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    # occurrence rank of each pair inside its logical expert, in flat (token, k) order
    occ = occurrence_ranks(flat, log2phy.shape[0])
    phy = log2phy[flat, occ % logcnt[flat]]
    return dispatch_from_phy(phy.reshape(T, K), num_slots, block_size)


def dispatch_from_phy(phy_ids: torch.Tensor, num_slots: int, block_size: int = 64) -> Dispatch:
    """Group already chosen slots ``phy_ids [T, K]`` (int64 in [0, P)) into padded blocks: the
    grouping half of the reference, shared by every replica-choice policy (``kernels.replica_choice``)."""
    dev = phy_ids.device
    T, K = phy_ids.shape
    phy = phy_ids.reshape(-1).long()
    M = phy.numel()
    pos = torch.arange(M, device=dev)
    # group by slot, keeping flat order inside a slot; pad every segment to block_size
    slot_counts = torch.bincount(phy, minlength=num_slots)
    padded = (slot_counts + block_size - 1) // block_size * block_size
    pad_start = torch.cumsum(padded, 0) - padded
    slot_start = torch.cumsum(slot_counts, 0) - slot_counts
    by_slot = torch.sort(phy, stable=True).indices
    phy_sorted = phy[by_slot]
    num_padded = int(padded.sum())
    sorted_ids = torch.full((num_padded,), M, dtype=torch.int64, device=dev)
    sorted_ids[pad_start[phy_sorted] + pos - slot_start[phy_sorted]] = by_slot
    block_slot = torch.repeat_interleave(torch.arange(num_slots, device=dev), padded // block_size)
    return Dispatch(phy.reshape(T, K), slot_counts, sorted_ids, block_slot, num_padded, block_size)


def replica_dispatch(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    num_slots: int,
    block_size: int = 64,
    impl: str | None = None,
) -> Dispatch:
    """Route ``topk_ids [T, K]`` (logical ids in [0, E)) to physical slots and group them.

    ``log2phy [E, R]`` int64 (-1 padded) and ``logcnt [E]`` int64 (>= 1) come from a validated
    routing map; they are not re-checked here (that would cost a device sync per layer). The
    Triton experts kernel needs ``block_size`` a power of two >= 16. ``impl``: see ``backend``.
    """
    if resolve_impl(impl, topk_ids.is_cuda) == "triton":
        try:  # optional: triton (resolve_impl checked it is installed); a bundled model runs without it
            from .dispatch_triton import replica_dispatch_triton
        except ImportError as e:
            raise triton_import_failed(e) from None

        _check(topk_ids, log2phy, logcnt, num_slots, block_size)
        return replica_dispatch_triton(topk_ids, log2phy, logcnt, num_slots, block_size)
    return replica_dispatch_reference(topk_ids, log2phy, logcnt, num_slots, block_size)
