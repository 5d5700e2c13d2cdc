"""Shared test helper: the EPLB-style maps of a slot layout."""

import torch


def slot_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phy2log [P]`` (logical expert of each slot) -> ``logcnt [E]``, ``log2phy [E, R]`` (slots of
    each expert in slot order, -1 padded; R = max replicas)."""
    logcnt = torch.bincount(phy2log, minlength=num_experts)
    log2phy = torch.full((num_experts, int(logcnt.max())), -1)
    for e in range(num_experts):
        s = (phy2log == e).nonzero().flatten()
        log2phy[e, : s.numel()] = s
    return logcnt, log2phy
