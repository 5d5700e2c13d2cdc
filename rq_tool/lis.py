"""Load-Imbalance Score and friends: pure functions on load tensors.

LIS (R&Q paper): for one MoE layer with E experts (or P physical slots) and loads ``n_e``,
``LIS = E * max_e n_e / sum_e n_e`` -- max over mean, 1.0 is perfect balance. The paper writes
the denominator as ``n * k`` (tokens x top-k), which equals ``sum_e n_e``.
"""

from __future__ import annotations

import torch


def lis(load: torch.Tensor) -> torch.Tensor:
    """``load [..., E]`` -> LIS ``[...]`` (float64). A layer with no tokens scores 1.0."""
    load = load.double()
    total = load.sum(-1)
    return torch.where(total > 0, load.shape[-1] * load.amax(-1) / total.clamp_min(1e-300), torch.ones_like(total))


def excess_removed(before: float, after: float) -> float:
    """Fraction of the excess imbalance ``LIS - 1`` that a change removed (1.0 = perfect)."""
    return 0.0 if before <= 1.0 else (before - after) / (before - 1.0)


def lis_by_batch(seq_load: torch.Tensor, batch_sizes) -> dict[int, dict[str, float]]:
    """Per-batch LIS for several batch sizes.

    ``seq_load [N, E]``: load of each calibration sequence. Consecutive sequences form batches of
    ``b`` (the trailing partial batch is dropped unless it is the only one). Returns
    ``{b: {"mean": ..., "max": ..., "batches": n}}`` for every ``b <= N``.
    """
    n = seq_load.shape[0]
    out: dict[int, dict[str, float]] = {}
    for b in batch_sizes:
        if b > n or b < 1:
            continue
        m = n // b
        per_batch = lis(seq_load[: m * b].reshape(m, b, -1).sum(1))
        out[int(b)] = {"mean": float(per_batch.mean()), "max": float(per_batch.max()), "batches": int(m)}
    return out


def slot_loads(load: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """Predicted load of each physical slot when expert tokens split evenly over replicas.

    ``load [E]``, ``phy2log [P]``, ``logcnt [E]`` -> ``[P]`` float64.
    """
    return load.double()[phy2log] / logcnt.double()[phy2log]
