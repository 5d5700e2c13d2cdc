"""Per-step expert-parallel load: steps resampled from calibration sequences, and device loads per step.

Legend: N calibration sequences (or chunks), L MoE layers, E logical experts, P physical slots per
layer (padded with -1 where layers differ), G devices, B steps, C devices of one expert.

Latency follows each step's busiest device, so plans are scored on **steps**: a step is the sum of
``per_step`` sequences' loads (``sample_steps``); a layout puts each layer's slots on devices
(``phy2log [L, P]``, ``slot_device [L, P]``, -1 = no slot) and a split policy decides how an
expert's pairs divide over its replicas in that step (``rq_tool.kernels.split``):

- ``round-robin``: replica r of expert e (c copies, n pairs) takes ``n // c + (r < n % c)``;
- ``load-aware``: water-filling over the replicas' devices, heaviest expert first, then a few
  Gauss-Seidel rounds -- exactly ``load_aware_split``, batched over layers here.

``step_device_loads`` returns ``[B, L, G]``; ``step_max_mean`` the busiest device over the mean
per step and layer (1.0 = balanced). Everything is vectorised over steps and layers.
"""

from __future__ import annotations

import torch

from ..kernels.split import _ROUNDS, _pour

POLICIES = ("round-robin", "load-aware")
_BIG = 1 << 50  # level of a padding device column: never filled


def rows_per_step(batch_tokens: int, tokens_per_row: float) -> int:
    """Rows of loads summed into one step of ``batch_tokens`` tokens (at least 1)."""
    return max(1, round(batch_tokens / max(tokens_per_row, 1e-9)))


def sample_steps(seq_loads: torch.Tensor, per_step: int, num_steps: int, seed: int = 0,
                 pool: torch.Tensor | None = None) -> torch.Tensor:
    """``seq_loads [N, L, E]`` -> ``counts [B, L, E]`` (same dtype): B steps of ``per_step`` sequences.

    Each step draws ``per_step`` distinct sequences from ``pool [M]`` (indices; default all N),
    with replacement only when the pool is smaller than a step. Seeded, deterministic.
    """
    N = seq_loads.shape[0]
    idx = torch.arange(N) if pool is None else torch.as_tensor(pool, dtype=torch.int64)
    M = idx.numel()
    assert M >= 1 and per_step >= 1 and num_steps >= 1
    g = torch.Generator().manual_seed(int(seed))
    if M >= per_step:
        pick = torch.argsort(torch.rand(num_steps, M, generator=g), dim=1)[:, :per_step]
    else:
        pick = torch.randint(0, M, (num_steps, per_step), generator=g)
    return seq_loads[idx[pick]].sum(1)


def _layer_maps(phy2log: torch.Tensor, num_experts: int):
    """``phy2log [L, P]`` (-1 pad) -> ``logcnt [L, E]``, ``rank [L, P]`` (replica index of a slot, by slot order)."""
    L, P = phy2log.shape
    valid = phy2log >= 0
    key = torch.where(valid, phy2log, num_experts) * P + torch.arange(P)
    order = torch.argsort(key, dim=1)
    e_sorted = torch.where(valid, phy2log, num_experts).gather(1, order)
    logcnt = torch.zeros(L, num_experts + 1, dtype=torch.int64).scatter_add_(1, e_sorted, torch.ones_like(e_sorted))
    start = logcnt.cumsum(1) - logcnt
    rank = torch.empty_like(phy2log)
    rank.scatter_(1, order, torch.arange(P).expand(L, P) - start.gather(1, e_sorted))
    return logcnt[:, :num_experts], rank


def _round_robin(counts, phy2log, slot_device, G):
    B, L, E = counts.shape
    logcnt, rank = _layer_maps(phy2log, E)
    valid = phy2log >= 0
    e = phy2log.clamp(min=0)
    n = counts.gather(2, e[None].expand(B, L, -1))  # [B, L, P] count of each slot's expert
    c = logcnt.gather(1, e).clamp(min=1)[None]
    share = torch.div(n, c, rounding_mode="floor") + (rank[None] < torch.remainder(n, c)).to(n.dtype)
    share = share * valid[None]
    out = torch.zeros(B, L, G, dtype=counts.dtype)
    return out.scatter_add_(2, slot_device.clamp(min=0)[None].expand(B, L, -1), share)


def _expert_devices(phy2log, slot_device, E, G):
    """``[L, E, G]`` bool: device g holds a slot of expert e."""
    L, P = phy2log.shape
    held = torch.zeros(L, E * G + 1, dtype=torch.bool)  # the last column takes the padding
    valid = phy2log >= 0
    flat = torch.where(valid, phy2log.clamp(min=0) * G + slot_device.clamp(min=0), E * G)
    held.scatter_(1, flat, True)
    return held[:, :-1].reshape(L, E, G)


def _load_aware(counts, phy2log, slot_device, G, rounds: int = _ROUNDS):
    B, L, E = counts.shape
    counts = counts.long()
    logcnt, _ = _layer_maps(phy2log, E)
    held = _expert_devices(phy2log, slot_device, E, G)  # [L, E, G]
    multi = logcnt > 1  # [L, E]
    load = torch.zeros(B, L, G, dtype=torch.int64)
    # experts with one slot sit on their device
    single_dev = torch.where(held, torch.arange(G), G).amin(-1)  # [L, E] (G = none)
    one = (~multi) & (logcnt == 1)
    idx = torch.where(one, single_dev, 0)
    load.scatter_add_(2, idx[None].expand(B, L, E), counts * one[None])
    M = int(multi.sum(1).max()) if multi.any() else 0
    if M == 0:
        return load
    # replicated experts, heaviest first by their total over the steps (ties: lower id)
    key = torch.where(multi, counts.sum(0).double(), -1.0)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :M]  # [L, M]
    present = torch.arange(M)[None] < multi.sum(1, keepdim=True)  # [L, M]
    devs_all = torch.sort(torch.where(held, torch.arange(G), G), dim=-1).values  # [L, E, G] ascending, G = pad
    C = int(held.sum(-1).max())
    devs = devs_all[:, :, :C].gather(1, order[..., None].expand(L, M, C))  # [L, M, C]
    dev_ok = (devs < G) & present[..., None]
    devs_c = devs.clamp(max=G - 1)
    shares = torch.zeros(M, B, L, C, dtype=torch.int64)
    amount_all = counts.gather(2, order[None].expand(B, L, M)) * present[None]  # [B, L, M]
    for it in range(1 + rounds):
        changed = it == 0
        for j in range(M):
            d_j, ok = devs_c[:, j], dev_ok[:, j]  # [L, C]
            idx = d_j[None].expand(B, L, C)
            if it:
                load.scatter_add_(2, idx, -shares[j])
            base = torch.where(ok[None], load.gather(2, idx), _BIG)
            add = _pour(base.reshape(B * L, C), amount_all[:, :, j].reshape(B * L)).view(B, L, C) * ok[None]
            changed = changed or not torch.equal(add, shares[j])
            shares[j] = add
            load.scatter_add_(2, idx, add)
        if not changed:  # a fixed point: further passes change nothing
            break
    return load


def step_device_loads(counts: torch.Tensor, phy2log: torch.Tensor, slot_device: torch.Tensor, num_devices: int,
                      policy: str = "load-aware") -> torch.Tensor:
    """``counts [B, L, E]`` (int), ``phy2log [L, P]``, ``slot_device [L, P]`` (-1 pad) -> ``[B, L, G]`` int64.

    Per step and layer, each expert's pairs are split over its slots by ``policy`` (module
    docstring) and summed per device. Equals ``rq_tool.kernels.split`` layer by layer.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown split policy {policy!r}; choose one of {', '.join(POLICIES)}")
    counts = counts.round().long() if counts.is_floating_point() else counts.long()
    phy2log, slot_device = phy2log.long(), slot_device.long()
    if policy == "round-robin":
        return _round_robin(counts, phy2log, slot_device, int(num_devices))
    return _load_aware(counts, phy2log, slot_device, int(num_devices))


def max_over_mean(device_load: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` -> ``[...]`` float64 busiest device / mean device (1.0 where nothing was routed)."""
    x = device_load.double()
    mean = x.mean(-1)
    return torch.where(mean > 0, x.amax(-1) / mean.clamp_min(1e-300), torch.ones_like(mean))


def step_max_mean(counts, phy2log, slot_device, num_devices: int, policy: str = "load-aware") -> torch.Tensor:
    """``[B, L]`` float64 per-step device max/mean of each layer (see ``step_device_loads``)."""
    return max_over_mean(step_device_loads(counts, phy2log, slot_device, num_devices, policy))


def contiguous_layout(num_layers: int, num_experts: int, num_devices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original model on standard EP: expert e on device ``e * G // E``. ``[L, E]`` each."""
    e = torch.arange(num_experts)
    return e.repeat(num_layers, 1), (e * num_devices // num_experts).repeat(num_layers, 1)


def spread(x: torch.Tensor) -> dict:
    """``x [B]`` per-step values -> ``{"mean", "p10", "p90", "max"}`` (floats)."""
    x = x.double().flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), "p10": float(q[0]), "p90": float(q[1]), "max": float(x.max())}
