"""Replica choice per step: which physical slot each routed (token, k) pair goes to.

Legend: T tokens, K top-k, E logical experts, R max replicas, P physical slots, G devices.

One entry point, :func:`choose_slots`, for both split policies of a routing map
(``defaults.SPLIT_POLICIES``) and for both a single process and one rank of an expert-parallel
group. A rank holds a slice of the step's tokens; ``counts_before [E]`` (pairs of each expert on
lower ranks) and ``step_counts [E]`` (pairs of each expert on all ranks) make its choice exactly
the one a single process makes on the whole step, the ranks' batches concatenated in rank order:

- ``round-robin-by-occurrence``: global occurrence ``j = counts_before[e] + local occurrence``
  goes to ``log2phy[e, j % logcnt[e]]`` (``replica_dispatch``'s rule).
- ``load-aware``: ``kernels.split.load_aware_split`` of ``step_counts`` gives every slot its
  quota; occurrences take consecutive quota ranges (``assign_slots``); a rank's own quota is the
  part of each slot's range that falls in its window ``[counts_before, counts_before + mine)``.

Implementations: torch (``kernels.split``) or Triton (``kernels.split_triton``), chosen by
``impl`` / ``RQ_KERNEL`` as everywhere in ``rq_tool.kernels``; index outputs are identical.
"""

from __future__ import annotations

import torch

from rq_tool import defaults

from .backend import resolve_impl, triton_import_failed
from .split import assign_slots, load_aware_split, occurrence_ranks

KERNEL_POLICY = {defaults.SPLIT_POLICY: "round-robin", defaults.LOAD_AWARE_POLICY: "load-aware"}


def window_quota(slot_counts: torch.Tensor, log2phy: torch.Tensor, counts_before: torch.Tensor,
                 mine: torch.Tensor) -> torch.Tensor:
    """A rank's share of a step's split. ``slot_counts [P]`` the step's quota per slot,
    ``log2phy [E, R]``, ``counts_before [E]`` / ``mine [E]`` this rank's occurrence window of each
    expert -> ``[P]`` int64: how much of each slot's quota range the window covers."""
    valid = log2phy >= 0
    quota = torch.where(valid, slot_counts[log2phy.clamp(min=0)], torch.zeros_like(log2phy))
    cum = torch.cumsum(quota, dim=1)
    lo, hi = counts_before.view(-1, 1), (counts_before + mine).view(-1, 1)
    part = (torch.minimum(cum, hi) - torch.maximum(cum - quota, lo)).clamp(min=0)
    out = torch.zeros_like(slot_counts)
    return out.index_add_(0, log2phy[valid], part[valid])


def choose_slots(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, policy: str,
                 slot_device: torch.Tensor | None = None, num_devices: int | None = None,
                 counts_before: torch.Tensor | None = None, step_counts: torch.Tensor | None = None,
                 impl: str | None = None) -> torch.Tensor:
    """``topk_ids [T, K]`` logical ids -> ``phy_ids [T, K]`` int64 physical slots (module docstring).

    ``policy``: a routing-map split policy. ``load-aware`` needs ``slot_device [P]`` and
    ``num_devices``. ``counts_before [E]`` / ``step_counts [E]`` (int64): this rank's position in
    an expert-parallel step; both None in a single process (the batch is the step).
    """
    if policy not in KERNEL_POLICY:
        raise ValueError(f"unknown split policy {policy!r}; choose one of {', '.join(KERNEL_POLICY)}")
    E = log2phy.shape[0]
    flat = topk_ids.reshape(-1).long()
    single = counts_before is None
    if policy == defaults.SPLIT_POLICY:  # (a single process runs kernels.replica_dispatch instead)
        occ = occurrence_ranks(flat, E)
        if not single:
            occ = occ + counts_before[flat]
        return log2phy[flat, occ % logcnt[flat]].view(topk_ids.shape)
    assert slot_device is not None and num_devices is not None, "load-aware choice needs slot_device and num_devices"
    mine = torch.bincount(flat, minlength=E)
    step = mine if single else step_counts
    if resolve_impl(impl, topk_ids.is_cuda) == "triton":
        try:  # optional: triton (resolve_impl checked it is installed); a bundled model runs without it
            from .split_triton import assign_slots_triton, load_aware_split_triton
        except ImportError as e:
            raise triton_import_failed(e) from None

        slot_counts = load_aware_split_triton(step.view(1, E), log2phy, logcnt, slot_device, num_devices)[0]
        if not single:
            slot_counts = window_quota(slot_counts, log2phy, counts_before, mine)
        return assign_slots_triton(topk_ids, log2phy, logcnt, slot_counts)
    slot_counts = load_aware_split(step.view(1, E), log2phy, logcnt, slot_device, num_devices)[0]
    if not single:
        slot_counts = window_quota(slot_counts, log2phy, counts_before, mine)
    return assign_slots(topk_ids, log2phy, logcnt, slot_counts)
