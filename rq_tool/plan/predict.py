"""What a layer layout predicts: LIS, stored bytes, quantization error; and the index maps.

Legend: E logical experts, P physical slots, S schemes, R max replicas per expert.

A layout is ``phy2log [P]`` + ``slot_scheme [P]``. Expert e's tokens split evenly over its
``logcnt[e]`` slots, so a slot of e carries ``load[e] / logcnt[e]`` tokens and, stored in scheme
s, contributes ``error[e, s] / logcnt[e]`` of predicted damage (``error[e, 0] == 0`` for the
source scheme). The single public entry point is ``predict_layer``; the helpers are shared with
the strategies so that their step-by-step arithmetic and the reported numbers agree.
"""

from __future__ import annotations

import torch

from ..lis import lis, slot_loads


def lis_of_counts(load: torch.Tensor, logcnt: torch.Tensor) -> float:
    """Predicted LIS of one layer from ``load [E]`` and ``logcnt [E]`` (``P = logcnt.sum()``).

    ``P * max_e(load[e] / logcnt[e]) / sum(load)``; 1.0 when the layer has no tokens.
    """
    total = float(load.sum())
    if total <= 0:
        return 1.0
    return float(logcnt.sum()) * float((load / logcnt).max()) / total


def log2phy_from_phy2log(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phy2log [P]`` -> ``(log2phy [E, R], logcnt [E])``, both int64.

    ``log2phy[e, :logcnt[e]]`` are the slots with ``phy2log == e`` in increasing order, the rest
    is -1; ``R = max(logcnt)`` (at least 1).
    """
    phy2log = phy2log.long()
    logcnt = torch.bincount(phy2log, minlength=num_logical)
    assert logcnt.numel() == num_logical, "phy2log names an expert >= num_logical"
    R = max(int(logcnt.max()) if num_logical else 0, 1)
    order = torch.argsort(phy2log, stable=True)  # slots grouped by expert, increasing within
    start = torch.cumsum(logcnt, 0) - logcnt
    rank = torch.arange(phy2log.numel()) - start[phy2log[order]]
    log2phy = torch.full((num_logical, R), -1, dtype=torch.int64)
    log2phy[phy2log[order], rank] = order
    return log2phy, logcnt


def slot_error(error: torch.Tensor, phy2log: torch.Tensor, slot_scheme: torch.Tensor,
               logcnt: torch.Tensor) -> torch.Tensor:
    """``[P]`` float64 predicted damage of each slot: ``error[phy2log, slot_scheme] / logcnt[phy2log]``.

    ``error [E, S]``; source-scheme slots contribute ``error[e, 0]`` (0 by contract).
    """
    return error[phy2log, slot_scheme] / logcnt[phy2log].double()


def check_layer(phy2log: torch.Tensor, slot_scheme: torch.Tensor, logcnt: torch.Tensor,
                log2phy: torch.Tensor, num_schemes: int) -> None:
    """Assert the layout invariants (see ``rq_tool.plan.types``)."""
    E = logcnt.numel()
    P = phy2log.numel()
    assert phy2log.dtype == slot_scheme.dtype == logcnt.dtype == log2phy.dtype == torch.int64
    assert slot_scheme.shape == (P,) and P >= E
    assert torch.equal(phy2log[:E], torch.arange(E)), "slots 0..E-1 must be the originals in expert order"
    assert int(phy2log.min()) >= 0 and int(phy2log.max()) < E
    assert int(slot_scheme.min()) >= 0 and int(slot_scheme.max()) < num_schemes
    assert int(logcnt.min()) >= 1 and int(logcnt.sum()) == P
    expect_l2p, expect_cnt = log2phy_from_phy2log(phy2log, E)
    assert torch.equal(expect_cnt, logcnt), "logcnt disagrees with phy2log"
    assert torch.equal(expect_l2p, log2phy), "log2phy disagrees with phy2log"


def predict_layer(load: torch.Tensor, error: torch.Tensor, scheme_bytes: torch.Tensor,
                  phy2log: torch.Tensor, slot_scheme: torch.Tensor) -> dict:
    """Everything a ``LayerPlan`` reports about one layout.

    ``load [E]`` float64, ``error [E, S]`` float64, ``scheme_bytes [S]`` int64, ``phy2log [P]``,
    ``slot_scheme [P]`` int64. Returns ``log2phy [E, R]``, ``logcnt [E]``, ``lis_before``,
    ``lis_after``, ``bytes_before`` (``E * scheme_bytes[0]``), ``bytes_after``, ``pred_error``.
    """
    E = load.numel()
    log2phy, logcnt = log2phy_from_phy2log(phy2log, E)
    quantized = slot_scheme != 0
    err = slot_error(error, phy2log, slot_scheme, logcnt)
    return {
        "log2phy": log2phy,
        "logcnt": logcnt,
        "lis_before": float(lis(load)),
        "lis_after": float(lis(slot_loads(load, phy2log, logcnt))),
        "bytes_before": E * int(scheme_bytes[0]),
        "bytes_after": int(scheme_bytes[slot_scheme].sum()),
        "pred_error": float(err[quantized].sum()),
    }
