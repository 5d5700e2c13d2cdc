"""Shared kernel-test cases: the routing grid every kernel is checked over, and the EPLB-style maps
of a slot layout."""

import torch

TOKENS = (0, 1, 33, 4096)  # empty, decode, ragged, a prefill-sized batch
EXPERTS = (8, 16, 64, 128)
TOP_K = (1, 2, 8)
ROUTING_GRID = [(T, E, K) for T in TOKENS for E in EXPERTS for K in TOP_K]  # (T, E, K)


def slot_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phy2log [P]`` (logical expert of each slot) -> ``logcnt [E]``, ``log2phy [E, R]`` (slots of
    each expert in slot order, -1 padded; R = max replicas)."""
    logcnt = torch.bincount(phy2log, minlength=num_experts)
    log2phy = torch.full((num_experts, int(logcnt.max())), -1)
    for e in range(num_experts):
        s = (phy2log == e).nonzero().flatten()
        log2phy[e, : s.numel()] = s
    return logcnt, log2phy
