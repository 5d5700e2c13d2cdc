"""rq rewrite's default plan (greedy with the accuracy guard): hot experts stay precise, replicas only where they hold up.

Legend: N calibration rows (sequences or chunks), L MoE layers, E logical experts, P physical
slots, S schemes (index 0 = the source scheme), G devices, F folds (held-out domains / clusters).

Per layer:

1. **Accuracy guard** (``rq_tool.plan.ep_plan.guard_schemes``): hot experts (load at or above the
   layer mean) and important ones (int8 damage in the layer's top quarter) keep the source
   precision; the others are quantized only to pay for replicas, cheapest predicted error per
   byte first, int8 before nf4, while the layer's predicted error stays within ``max_error``.
   The bytes freed buy ``R_max`` source-precision replicas.
2. **Greedy replicas**: the heaviest slot's expert gets a copy while the layer's predicted LIS
   drops by ``min_gain`` (``rq_tool.plan.strategies._bundle``), at most ``R_max`` copies.
3. **Do no harm** (leave-one-fold-out on the calibration rows, ``rq_tool.plan.balance.make_folds``):
   for each fold, the same number of replicas is planned on the other folds, its slots placed
   within the original per-device memory share (as a deployment without a placement would,
   ``rq_tool.eval.ep.place_in_share``) for every G in ``defaults.DEVICE_COUNTS``, and scored on
   per-step device max/mean of the held-out fold's steps (round-robin split,
   ``rq_tool.plan.steps``). If any fold / G is busier than the original contiguous layout, the
   layer replicates less (half, down to none: the original layout).
4. **Undo what is not needed**: quantized originals go back to the most precise scheme the
   budget still has room for (largest error first, ``rq_tool.plan.ep_plan._undo``).

``plan_guarded`` also predicts the plan's per-step balance (``predict_balance``, mean and
p10-p90 over resampled steps) at the largest G, for the plan table.
"""

from __future__ import annotations

import math

import torch

from .. import defaults
from .balance import Layout, make_folds, predict_balance
from .ep_plan import _undo, guard_schemes
from .layout import replicate, slots_of
from .predict import check_layer, predict_layer
from .steps import contiguous_layout, sample_steps, step_max_mean
from .strategies import _bundle
from .types import LayerPlan, Plan, PlanOptions

NUM_STEPS = 24  # held-out steps scored per fold
_TOLERANCE = 1.0 + 1e-9  # held-out max/mean over the original's that still counts as "not worse"
POLICY = "round-robin"  # a plan without a placement splits an expert's tokens evenly over its replicas


def greedy_count(load: torch.Tensor, limit: int, opt: PlanOptions) -> int:
    """Replicas the greedy LIS loop adds to ``load [E]`` (whole bundles only), at most ``limit``."""
    cnt = torch.ones(load.numel(), dtype=torch.int64)
    k = 0
    while True:
        b = _bundle(load, cnt, opt)
        if b is None or k + len(b[0]) > limit:
            return k
        for e in b[0]:
            cnt[e] += 1
        k += len(b[0])


def layer_slots(load: torch.Tensor, k: int, scheme: torch.Tensor, error: torch.Tensor, nbytes: torch.Tensor,
                budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``load [E]``, ``k`` replicas, guard ``scheme [E]`` -> ``(phy2log [P], slot_scheme [P])``: the
    heaviest-per-copy experts copied in the source scheme, then originals restored while the budget allows."""
    E = load.numel()
    phy2log = slots_of(replicate(load[None], torch.tensor([E + k])))[0]
    return phy2log, _undo(scheme, phy2log, torch.zeros(phy2log.numel(), dtype=torch.int64), error, nbytes,
                          int(budget), 1)


def placed(load: torch.Tensor, phy2log: torch.Tensor, slot_bytes: torch.Tensor, G: int, original_bytes: int):
    """Slots placed on G devices within the original share, planned on ``load [E]`` -> ``slot_device [P]``."""
    from ..eval.ep import place_in_share

    cnt = torch.bincount(phy2log, minlength=load.numel()).double()
    return place_in_share(load.double()[phy2log] / cnt[phy2log], slot_bytes, G, original_bytes)


def heldout_ratio(seq: torch.Tensor, fold: torch.Tensor | None, l: int, k: int, slot_bytes_of, src_bytes: int,
                  per_step: int, device_counts, cache: dict, stop_above: float = math.inf) -> float:
    """Worst held-out per-step max/mean of layer ``l`` with ``k`` replicas over the original's (1.0 = as good).

    ``seq [N, L, E]`` int64, ``fold [N]`` (None: no folds, 1.0); ``slot_bytes_of(phy2log) -> [P]``;
    ``cache``: what does not depend on ``k``, shared over calls: ``("steps", f)`` fold f's sampled held-out
    steps ``[B, L, E]``, ``("original", f, l, G)`` the original layout's score on them. Returns as soon as
    the worst exceeds ``stop_above`` (then a value above it, not necessarily the worst)."""
    if fold is None or k == 0:
        return 1.0
    E = seq.shape[-1]
    worst = 0.0
    for f in range(int(fold.max()) + 1):
        if ("steps", f) not in cache:
            cache["steps", f] = sample_steps(seq, per_step, NUM_STEPS, seed=f, pool=(fold == f).nonzero().flatten())
        test = cache["steps", f][:, l:l + 1]
        train = seq[fold != f, l].double().sum(0)
        phy2log = slots_of(replicate(train[None], torch.tensor([E + k])))[0]
        nbytes = slot_bytes_of(phy2log)
        for G in device_counts:
            if ("original", f, l, G) not in cache:
                orig_phy, orig_dev = contiguous_layout(1, E, G)
                cache["original", f, l, G] = float(step_max_mean(test, orig_phy, orig_dev, G, POLICY).mean())
            dev = placed(train, phy2log, nbytes, G, E * src_bytes)
            after = float(step_max_mean(test, phy2log[None], dev[None], G, POLICY).mean())
            worst = max(worst, after / max(cache["original", f, l, G], 1e-300))
            if worst > stop_above:
                return worst
    return worst


def plan_guarded(seq_loads: torch.Tensor, error: torch.Tensor, schemes, scheme_bytes: torch.Tensor,
                 budget_bytes: torch.Tensor, options: PlanOptions, *, groups=None, group_names=None,
                 per_step: int = defaults.SEQS_PER_STEP, layer_ids=None,
                 device_counts=defaults.DEVICE_COUNTS, rows_per_seq: int = 1) -> Plan:
    """The default ``rq rewrite`` plan (module docstring).

    ``seq_loads [N, L, E]`` (N = 1: pooled loads only, no held-out check), ``error [L, E, S]``
    (relative to expert output power), ``scheme_bytes [S]``, ``budget_bytes [L]`` per layer;
    ``rows_per_seq``: rows of ``seq_loads`` per calibration sequence (its chunks; ``make_folds``);
    ``options.max_error`` the guard's cap (None: no cap), ``min_gain`` / replica caps as for greedy.
    """
    N, L, E = seq_loads.shape
    nbytes = torch.as_tensor(scheme_bytes, dtype=torch.int64)
    budget = torch.as_tensor(budget_bytes, dtype=torch.int64).expand(L)
    seq = seq_loads.round().long()
    load = seq_loads.double().sum(0)
    ids = list(range(L)) if layer_ids is None else list(layer_ids)
    fold, fold_names = make_folds(seq, groups, group_names, per_step, rows_per_seq=rows_per_seq) if N > 1 else (None, [])
    src = int(nbytes[0])
    cache: dict = {}
    layers, ratios, wanted = [], [], []
    for l in range(L):
        scheme, r_max = guard_schemes(load[l], error[l], nbytes, int(budget[l]), options.max_error)
        cap = min(r_max, int(options.max_slots_factor * E + 1e-9) - E)
        k = greedy_count(load[l], cap, options)
        wanted.append(k)

        def slot_bytes_of(phy2log, scheme=scheme):
            s = torch.zeros(phy2log.numel(), dtype=torch.int64)
            s[:E] = scheme
            return nbytes[s]

        def ratio_of(k, slot_bytes_of=slot_bytes_of):
            return heldout_ratio(seq, fold, l, k, slot_bytes_of, src, per_step, device_counts, cache, _TOLERANCE)

        ratio = ratio_of(k)
        while k > 0 and ratio > _TOLERANCE:  # replication did not hold up on a held-out fold: fewer replicas
            k //= 2
            ratio = ratio_of(k)
        ratios.append(ratio)
        phy2log, slot_scheme = layer_slots(load[l], k, scheme, error[l], nbytes, int(budget[l]))
        pred = predict_layer(load[l], error[l].double(), nbytes, phy2log, slot_scheme)
        check_layer(phy2log, slot_scheme, pred["logcnt"], pred["log2phy"], len(schemes))
        layers.append(LayerPlan(layer=ids[l], phy2log=phy2log, slot_scheme=slot_scheme, budget_bytes=int(budget[l]),
                                **pred))
        assert layers[-1].bytes_after <= int(budget[l]), f"layer {ids[l]} over budget"
    G = max(device_counts)
    rows = []
    orig_phy, orig_dev = contiguous_layout(1, E, G)
    for lp in layers:  # a layer without replicas keeps the original layout (and placement)
        dev = (placed(load[len(rows)], lp.phy2log, nbytes[lp.slot_scheme], G, lp.bytes_before) if lp.num_replicas
               else orig_dev[0])
        rows.append((lp.phy2log if lp.num_replicas else orig_phy[0], dev))
    P = max(r[0].numel() for r in rows)
    pad = lambda i: torch.stack([torch.cat([r[i], torch.full((P - r[i].numel(),), -1)]) for r in rows])  # noqa: E731
    balance = predict_balance(seq, Layout(pad(0), pad(1)), Layout(*contiguous_layout(L, E, G)), G,
                              per_step=per_step, groups=groups, group_names=group_names)
    # choice per layer: "replicated", "original" (the held-out check took every replica back) or
    # "no gain" (no replica lowers LIS by min_gain within what the guard frees)
    choice = ["replicated" if lp.num_replicas else ("original" if w else "no gain") for lp, w in zip(layers, wanted)]
    balance.update({"num_devices": G, "policy": POLICY, "folds": fold_names, "heldout_ratio": ratios,
                    "choice": choice, "wanted_replicas": wanted, "device_counts": list(device_counts)})
    return Plan(layers=tuple(layers), schemes=tuple(schemes), scheme_bytes=tuple(int(b) for b in nbytes),
                options=options, global_budget=False, budget_bytes=int(budget.sum()), balance=balance)
