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
    routing-map split ``policy`` -> ``[B, G]`` int64 pairs per device.

    One split per step, as the runtime runs it: ``load_aware_split`` on several rows orders the
    replicated experts by their column sums, which is not what each step alone would do."""
    slot = torch.cat([split_counts(KERNEL_POLICY[policy], row.view(1, -1).long(), log2phy, logcnt, slot_device,
                                   num_devices) for row in counts])
    return torch.zeros(counts.shape[0], num_devices, dtype=torch.int64).index_add_(1, slot_device.long(), slot)


def step_expert_counts(model, steps: torch.Tensor) -> torch.Tensor:
    """Run ``steps [S, B, T]`` (input ids, one forward each) in this process -> ``[L, S, E]`` int64
    pairs routed to each logical expert of each MoE layer in each step."""
    from ..arch import get_family
    from .measure import ExpertCounter

    counts = []
    with ExpertCounter(model, get_family(model.config)) as counter, torch.no_grad():
        for ids in steps:
            counter.start_batch()
            model(ids)
            counts.append(torch.stack([b.clone() for b in counter.batch_load]))
    return torch.stack(counts, 1)


def predicted_step_loads(model, steps: torch.Tensor, num_devices: int) -> torch.Tensor:
    """``[L, S, G]`` pairs per device predicted for ``steps [S, B, T]`` from a single-process run:
    a rewritten model's own placement and split policy, otherwise the contiguous layout."""
    from ..runtime import RQExperts

    counts = step_expert_counts(model, steps)
    rq = [m for m in model.modules() if isinstance(m, RQExperts)]
    if not rq:
        return torch.stack([contiguous_step_loads(c, num_devices) for c in counts])
    return torch.stack([placed_step_loads(c, e.log2phy, e.logcnt, e.slot_device, num_devices, e.split_policy)
                        for c, e in zip(counts, rq)])
