"""Per-step expert-parallel load, predicted: routed pairs per device for each step of a run.

Legend: B steps, E logical experts, R max replicas, P physical slots, G devices.

The simulator counterpart of the runtime's counters (``rq_tool.runtime.ep.ep_counters``): from a
step's expert counts (a single-process run of the same batches) the pairs each device receives
under the standard contiguous layout of the original model, or under a rewritten layer's
placement and split policy (the same ``kernels.split`` rule the runtime runs). They agree with
the measured counters exactly, pair for pair, whenever the routing itself is the same.
"""

from __future__ import annotations

import torch

from ..kernels.replica_choice import KERNEL_POLICY
from ..kernels.split import split_counts
from .ep import contiguous_devices


def contiguous_step_loads(counts: torch.Tensor, num_devices: int) -> torch.Tensor:
    """``counts [B, E]`` -> ``[B, G]`` int64: expert e on device ``e * G // E`` (transformers' EP layout)."""
    counts = counts.long()
    dev = contiguous_devices(counts.shape[1], num_devices)
    return torch.zeros(counts.shape[0], num_devices, dtype=torch.int64).index_add_(1, dev, counts)


def placed_step_loads(counts: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, slot_device: torch.Tensor,
                      num_devices: int, policy: str) -> torch.Tensor:
    """``counts [B, E]``, a layer's ``log2phy [E, R]`` / ``logcnt [E]`` / ``slot_device [P]`` and its
    routing-map split ``policy`` -> ``[B, G]`` int64 pairs per device."""
    slot = split_counts(KERNEL_POLICY[policy], counts.long(), log2phy, logcnt, slot_device, num_devices)
    return torch.zeros(counts.shape[0], num_devices, dtype=torch.int64).index_add_(1, slot_device.long(), slot)
