"""``rq rewrite --ep-size G``: replicas, schemes and devices for expert parallelism, accuracy first.

Legend: N calibration sequences, L MoE layers, E logical experts, P physical slots, S schemes
(index 0 = the source scheme), G devices.

1. **Accuracy guard** (``guard_schemes``): hot experts (load at or above the layer mean) and
   important ones (int8 damage in the layer's top quarter) keep the source precision, and so do
   all replicas. The other experts are quantized only to pay for replicas: cheapest predicted
   error per byte saved first, every move to the larger quantized scheme (int8) before any move
   to a smaller one (nf4), while the layer's predicted error stays within ``max_error``
   (relative to its expert output power; a budget below 1.0x is still met, whatever the error).
   The bytes freed buy ``R_max`` source-precision replicas per layer.
2. **Per-step, shift-robust placement** (``rq_tool.plan.balance.plan_balance``, load-aware
   dispatch): up to ``E + R_max`` slots per layer, each device within its exact share of the
   budget (``budget / G`` bytes), planned and checked on held-out calibration domains; a layer
   where replication does not hold up keeps the original experts on standard EP.
3. **Undo what is not needed**: quantized originals whose device still has room for their source
   bytes go back to the source precision (largest error first).
"""

from __future__ import annotations

import torch

from .. import defaults
from ..errors import RQError
from .balance import Layout, plan_balance, predict_balance
from .predict import check_layer, predict_layer
from .steps import contiguous_layout
from .types import LayerPlan, Plan, PlanOptions


def guard_schemes(load: torch.Tensor, error: torch.Tensor, nbytes: torch.Tensor, budget: int,
                  max_error: float | None) -> tuple[torch.Tensor, int]:
    """One layer: ``load [E]``, ``error [E, S]``, ``nbytes [S]``, ``budget`` bytes ->
    ``(scheme [E]`` of each original, ``R_max`` affordable source-precision replicas``)``."""
    E, S = error.shape
    src = int(nbytes[0])
    quant = sorted(range(1, S), key=lambda s: -int(nbytes[s]))  # larger (less lossy) schemes first
    hot = load >= load.sum() / E
    if S > 1:
        q = torch.quantile(error[:, quant[0]], 0.75)
        hot |= error[:, quant[0]] > q
    scheme = torch.zeros(E, dtype=torch.int64)
    total_err = 0.0

    def moves(allowed):
        out = []
        for prev, s in zip([0] + quant[:-1], quant):
            for e in allowed.nonzero().flatten().tolist():
                saved = int(nbytes[prev] - nbytes[s])
                if saved > 0:
                    out.append((float(error[e, s] - error[e, prev]) / saved, e, prev, s))
        # phase by target scheme (int8 before nf4), cheapest error per byte within a phase
        return sorted(out, key=lambda m: (quant.index(m[3]), m[0], m[1]))

    def used():
        return int(nbytes[scheme].sum())

    # a budget below the source bytes: quantize (guard or not) until the originals fit
    for _, e, prev, s in moves(torch.ones(E, dtype=torch.bool)):
        if used() <= budget:
            break
        if int(scheme[e]) == prev:
            scheme[e] = s
            total_err += float(error[e, s] - error[e, prev])
    cap = float("inf") if max_error is None else float(max_error)
    for _, e, prev, s in moves(~hot):
        if int(scheme[e]) != prev:
            continue
        add = float(error[e, s] - error[e, prev])
        if total_err + add > cap:
            continue
        scheme[e] = s
        total_err += add
    return scheme, max(0, (budget - used()) // src)


def _undo(scheme, phy2log, dev, error, nbytes, capacity, G):
    """Each quantized original goes back to the most precise scheme its device has room for
    (source first, then the larger quantized ones; largest error first)."""
    E = scheme.numel()
    slot_scheme = torch.zeros(phy2log.numel(), dtype=torch.int64)
    slot_scheme[:E] = scheme
    used = torch.zeros(G, dtype=torch.int64).index_add_(0, dev, nbytes[slot_scheme])
    better = sorted(range(nbytes.numel()), key=lambda s: -int(nbytes[s]))
    for e in sorted(range(E), key=lambda e: -float(error[e, int(scheme[e])])):
        s = int(slot_scheme[e])
        for t in better:
            extra = int(nbytes[t] - nbytes[s])
            if extra <= 0:
                break
            if int(used[dev[e]]) + extra <= capacity:
                slot_scheme[e] = t
                used[dev[e]] += extra
                break
    return slot_scheme


def plan_ep(seq_loads: torch.Tensor, error: torch.Tensor, schemes, scheme_bytes: torch.Tensor,
            budget_bytes: torch.Tensor, num_devices: int, *, max_error: float | None = defaults.MAX_ERROR,
            groups=None, group_names=None, per_step: int = defaults.SEQS_PER_STEP, layer_ids=None,
            error_weight: str = "quant_error", fill_all: bool = True, rows_per_seq: int = 1) -> Plan:
    """The ``--ep-size`` plan (module docstring).

    ``seq_loads [N, L, E]`` (N = 1: pooled loads only), ``error [L, E, S]``, ``scheme_bytes
    [S]``, ``budget_bytes [L]`` per layer; every device gets ``budget_bytes // G`` of each layer.
    ``fill_all``: room left after the level fill takes extra copies (more per-step slack for
    load-aware dispatch; what stays unused goes back to precision either way); ``rows_per_seq``:
    rows of ``seq_loads`` per calibration sequence (``make_folds``).
    """
    N, L, E = seq_loads.shape
    G = int(num_devices)
    nbytes = torch.as_tensor(scheme_bytes, dtype=torch.int64)
    budget = torch.as_tensor(budget_bytes, dtype=torch.int64).expand(L)
    load = seq_loads.double().sum(0)
    ids = list(range(L)) if layer_ids is None else list(layer_ids)
    guard = [guard_schemes(load[l], error[l], nbytes, int(budget[l]), max_error) for l in range(L)]
    first = torch.stack([nbytes[g[0]] for g in guard]).double()  # [L, E]
    replica = torch.full((L, E), float(nbytes[0]), dtype=torch.float64)
    capacity = (budget // G).double()
    num_slots = torch.tensor([E + g[1] for g in guard])
    original = Layout(*contiguous_layout(L, E, G))
    seq = seq_loads.round().long()
    res = plan_balance(seq, G, num_slots, original, policy="load-aware", per_step=per_step, groups=groups,
                       group_names=group_names, first_size=first, replica_size=replica, capacity=capacity,
                       fill_all=fill_all, rows_per_seq=rows_per_seq)
    layers = []
    for l in range(L):
        phy2log, dev = res.layout.layer(l)
        slot_scheme = _undo(guard[l][0], phy2log, dev, error[l], nbytes, int(capacity[l]), G)
        pred = predict_layer(load[l], error[l].double(), nbytes, phy2log, slot_scheme)
        check_layer(phy2log, slot_scheme, pred["logcnt"], pred["log2phy"], len(schemes))
        layers.append(LayerPlan(layer=ids[l], phy2log=phy2log, slot_scheme=slot_scheme, budget_bytes=int(budget[l]),
                                slot_device=dev, **pred))
        per_dev = torch.zeros(G, dtype=torch.int64).index_add_(0, dev, nbytes[slot_scheme])
        if int(per_dev.max()) > int(capacity[l]):
            raise RQError(f"layer {ids[l]}: the slots do not pack into {G} device shares of {int(capacity[l])} bytes",
                          hint="raise --budget or use fewer devices")
    balance = predict_balance(seq, res.layout, original, G, per_step=per_step, groups=groups,
                              group_names=group_names)
    balance["choice"] = res.choice
    balance["folds"] = res.folds
    balance["heldout_ratio"] = [max(res.ratio[c][f][l] for f in range(len(res.ratio[c])))
                                for l, c in enumerate(res.choice)]
    options = PlanOptions(strategy="balance", max_error=max_error, error_weight=error_weight)
    return Plan(layers=tuple(layers), schemes=tuple(schemes), scheme_bytes=tuple(int(b) for b in nbytes),
                options=options, global_budget=False, budget_bytes=int(budget.sum()), num_devices=G,
                balance=balance)
