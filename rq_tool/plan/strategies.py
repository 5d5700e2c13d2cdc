"""Replicate-and-quantize planning: strategies by name, and the entry point ``make_plan``.

Legend: L MoE layers, E logical experts, P physical slots (per layer), Q slots of a group of
layers planned under one budget, S quantization schemes (index 0 = the source scheme).

The greedy heuristic (default). A layer starts with one source-scheme slot per expert. If the
budget is below that (``--budget 0.9``), slots are first quantized, cheapest predicted error per
byte saved first, until the layer fits. Then, while it helps: the candidate is the expert with
the heaviest slot (``argmax load[e] / logcnt[e]``); giving it one more slot must lower the
layer's predicted LIS by at least ``min_gain`` of its current value. (When k experts tie for the
heaviest slot, one replica only adds a slot and LIS rises; so a step adds the fewest replicas,
each to the then-heaviest slot, that reach ``min_gain``, all or none.) Every scheme is tried for
each new replica; for each, the bytes over budget are paid for by moving other slots to cheaper
schemes (bf16 -> int8, int8 -> nf4, ...), cheapest error per byte saved first (with, at every
step, the option to finish with the single move of least error that covers what is left); the
scheme with the least total added error wins. Replication stops at the first of: no gain,
nothing affordable, ``max_error`` would be exceeded, the candidate has ``max_replicas_per_expert``
slots, or P would exceed ``max_slots_factor * E``.

With a global budget the same loop runs over all layers at once: each step extends the layer
whose candidate replicas give the largest relative LIS reduction per added slot, and pays with
the cheapest slots of any layer; a layer that can no longer gain (or afford, or stay under
``max_error``) drops out while the others go on.

Errors are additive per slot: a slot of expert e in scheme s costs ``error[e, s] / logcnt[e]``
(its share of e's tokens), so adding a replica also changes the cost of e's other slots.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .. import defaults
from ..errors import RQError
from .predict import check_layer, lis_of_counts, predict_layer
from .types import LayerPlan, Plan, PlanOptions

Layouts = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (phy2log [P], slot_scheme [P])

# name -> fn(load [L, E], error [L, E, S], schemes [S], scheme_bytes [S], budget ([L] int64, or
# an int when global_budget), options, global_budget, layer_ids [L]) -> Layouts. Each fn has
# ``enforces_budget`` and a one-line docstring summary (CLI help).
STRATEGIES: dict[str, Callable[..., Layouts]] = {}


def _register(name: str, *, enforces_budget: bool):
    def wrap(fn):
        fn.enforces_budget = enforces_budget
        STRATEGIES[name] = fn
        return fn

    return wrap


class _Slots:
    """Mutable slot table of a group of layers planned under one budget (flat, creation order).

    ``layer/expert/scheme [Q]`` int64; ``cnt [L, E]`` int64 slots per expert; ``rows [Q, S]``
    float64 the error row of each slot's expert (``error [L, E, S]`` gathered once, kept in step);
    ``nbytes [S]`` int64. Starts with one source-scheme slot per expert.
    """

    def __init__(self, error, nbytes):
        L, E, S = error.shape
        self.error, self.nbytes = error, nbytes
        self.layer = torch.arange(L).repeat_interleave(E)
        self.expert = torch.arange(E).repeat(L)
        self.scheme = torch.zeros(L * E, dtype=torch.int64)
        self.cnt = torch.ones(L, E, dtype=torch.int64)
        self.rows = error.reshape(L * E, S).clone()

    def copy(self) -> "_Slots":
        new = object.__new__(_Slots)
        new.error, new.nbytes = self.error, self.nbytes
        for name in ("layer", "expert", "scheme", "cnt", "rows"):
            setattr(new, name, getattr(self, name).clone())
        return new

    def add_slot(self, layer: int, expert: int, scheme: int) -> None:
        self.layer = torch.cat([self.layer, torch.tensor([layer])])
        self.expert = torch.cat([self.expert, torch.tensor([expert])])
        self.scheme = torch.cat([self.scheme, torch.tensor([scheme])])
        self.rows = torch.cat([self.rows, self.error[layer, expert][None]])
        self.cnt[layer, expert] += 1

    def bytes(self) -> int:
        return int(self.nbytes.index_select(0, self.scheme).sum())

    def error_table(self) -> torch.Tensor:
        """``[Q, S]`` predicted error of each slot if it were stored in each scheme."""
        cnt = self.cnt.view(-1).index_select(0, self.layer * self.cnt.shape[1] + self.expert)
        return self.rows / cnt[:, None].double()

    def total_error(self) -> float:
        return float(self.error_table().gather(1, self.scheme[:, None]).sum())

    def layouts(self) -> Layouts:
        return [(self.expert[self.layer == l], self.scheme[self.layer == l]) for l in range(self.cnt.shape[0])]


def _pay(slots: _Slots, deficit: int, frozen: torch.Tensor | None = None) -> list[tuple[int, int]] | None:
    """Moves ``[(slot, new_scheme)]`` to cheaper schemes saving ``>= deficit`` bytes at low error.

    Greedy by added error per byte saved; at each step the single covering move of least added
    error is also considered as a way to finish, and the cheapest finish wins. ``frozen [Q]``
    bool: slots that may not move. ``None`` when even the cheapest schemes cannot save enough.
    """
    if deficit <= 0:
        return []
    nbytes = slots.nbytes
    movable = torch.ones_like(slots.scheme, dtype=torch.bool) if frozen is None else ~frozen
    if int(((nbytes.index_select(0, slots.scheme) - nbytes.min()) * movable).sum()) < deficit:
        return None
    table = slots.error_table()  # cnt does not change while paying
    scheme = slots.scheme.clone()
    moves: list[tuple[int, int]] = []
    spent = 0.0
    best: tuple[float, list[tuple[int, int]]] | None = None
    S = nbytes.numel()
    while True:
        delta = table - table.gather(1, scheme[:, None])
        saved = nbytes.index_select(0, scheme)[:, None] - nbytes[None, :]
        valid = (saved > 0) & movable[:, None]
        cover = torch.where(valid & (saved >= deficit), delta, math.inf)
        k = int(torch.argmin(cover))
        if math.isfinite(float(cover.view(-1)[k])):
            finish = spent + float(cover.view(-1)[k])
            if best is None or finish < best[0]:
                best = (finish, moves + [(k // S, k % S)])
        k = int(torch.argmin(torch.where(valid, delta / saved.clamp_min(1), math.inf)))
        i, s = k // S, k % S
        if int(saved[i, s]) >= deficit:  # the ratio move finishes; the covering move above is no worse
            break
        moves.append((i, s))
        spent += float(delta[i, s])
        deficit -= int(saved[i, s])
        scheme[i] = s
    assert best is not None
    return best[1]


def _apply(slots: _Slots, moves: list[tuple[int, int]]) -> None:
    for i, s in moves:
        slots.scheme[i] = s


def _fit_budget(slots: _Slots, budget: int) -> None:
    """Quantize slots (cheapest error per byte first) until ``slots.bytes() <= budget``."""
    moves = _pay(slots, slots.bytes() - budget)
    assert moves is not None, "budget feasibility is checked before planning"
    _apply(slots, moves)


def _bundle(load: torch.Tensor, cnt: torch.Tensor, opt: PlanOptions) -> tuple[list[int], float] | None:
    """The fewest replicas that lower a layer's LIS by ``min_gain``, each to the heaviest slot.

    ``load [E]``, ``cnt [E]`` -> (experts to replicate, in order; relative LIS gain), or None when
    the caps are reached first. One replica usually suffices; k experts tied at the top need k
    (a replica of only one of them adds a slot without lowering the max, so LIS goes up).
    """
    E = load.numel()
    if float(load.sum()) <= 0:
        return None
    max_slots = math.floor(opt.max_slots_factor * E + 1e-9)
    before = lis_of_counts(load, cnt)
    cnt = cnt.clone()
    experts: list[int] = []
    while True:
        e = int(torch.argmax(load / cnt))  # ties: lowest expert id
        if int(cnt[e]) >= opt.max_replicas_per_expert or int(cnt.sum()) + 1 > max_slots:
            return None
        cnt[e] += 1
        experts.append(e)
        gain = (before - lis_of_counts(load, cnt)) / before
        if gain >= opt.min_gain:
            return experts, gain


def _best_replica(slots: _Slots, layer: int, expert: int, budget: int | None,
                  max_error: float | None) -> _Slots | None:
    """The cheapest way (in added predicted error) to give ``expert`` one more slot within budget."""
    before = slots.total_error()
    best: tuple[float, _Slots] | None = None
    for s in range(slots.nbytes.numel()):
        trial = slots.copy()
        trial.add_slot(layer, expert, s)
        if budget is not None:
            frozen = torch.zeros_like(trial.scheme, dtype=torch.bool)
            frozen[-1] = True  # the replica's own scheme is the one being tried
            moves = _pay(trial, trial.bytes() - budget, frozen)
            if moves is None:
                continue
            _apply(trial, moves)
        total = trial.total_error()
        if max_error is not None and total > max_error:
            continue
        if best is None or total - before < best[0]:
            best = (total - before, trial)
    return None if best is None else best[1]


def _greedy_group(load, error, nbytes, budget: int | None, opt: PlanOptions, source_only: bool = False) -> Layouts:
    """Greedy replication over ``load [L, E]`` under one budget (None: unlimited, see replicate-only)."""
    slots = _Slots(error, nbytes[:1] if source_only else nbytes)
    if budget is not None:
        _fit_budget(slots, budget)
    max_error = None if source_only else opt.max_error
    # a layer's bundle depends only on its own counts: recompute it only when that layer changes
    bundles = {l: _bundle(load[l], slots.cnt[l], opt) for l in range(load.shape[0])}
    while True:
        active = [l for l, b in bundles.items() if b is not None]
        if not active:
            break
        # global budget: the layer with the largest LIS reduction per added slot (ties: lowest id)
        l = max(active, key=lambda x: bundles[x][1] / len(bundles[x][0]))
        trial: _Slots | None = slots
        for e in bundles[l][0]:
            trial = _best_replica(trial, l, e, budget, max_error)
            if trial is None:  # unaffordable or over max_error: this layer is done, the rest go on
                break
        if trial is None:
            bundles[l] = None
        else:
            slots = trial
            bundles[l] = _bundle(load[l], slots.cnt[l], opt)
    return slots.layouts()


def _by_group(fn, load, error, nbytes, budget, global_budget, *args) -> Layouts:
    if global_budget:
        return fn(load, error, nbytes, budget, *args)
    out: Layouts = []
    for l in range(load.shape[0]):
        out += fn(load[l:l + 1], error[l:l + 1], nbytes, None if budget is None else int(budget[l]), *args)
    return out


@_register("greedy", enforces_budget=True)
def greedy(load, error, schemes, nbytes, budget, opt: PlanOptions, global_budget: bool, layer_ids) -> Layouts:
    """Replicate the heaviest expert while it lowers LIS; pay for it by quantizing the slots that hurt least."""
    return _by_group(_greedy_group, load, error, nbytes, budget, global_budget, opt)


@_register("replicate-only", enforces_budget=False)
def replicate_only(load, error, schemes, nbytes, budget, opt: PlanOptions, global_budget: bool, layer_ids) -> Layouts:
    """EPLB-style replication, no quantization: memory grows by one expert per replica (budget not enforced)."""
    return _by_group(_greedy_group, load, error, nbytes, None, False, opt, True)


def _paper_group(load, error, nbytes, budget: int, int8: int, layer_ids: Sequence[int]) -> Layouts:
    slots = _Slots(error, nbytes)
    hot = torch.zeros(load.shape, dtype=torch.bool)
    for l in range(load.shape[0]):
        if float(load[l].sum()) > 0:
            e = int(torch.argmax(load[l]))
            hot[l, e] = True
            slots.add_slot(l, e, int8)
    # least important first (lowest int8 error); a replicated expert's original goes last so that
    # it keeps a full-precision copy whenever the budget allows
    order = sorted((bool(hot[l, e]), float(error[l, e, int8]), i)
                   for i, (l, e) in enumerate(zip(slots.layer.tolist(), slots.expert.tolist()))
                   if int(nbytes[slots.scheme[i]]) > int(nbytes[int8]))
    for _, _, i in order:
        if slots.bytes() <= budget:
            break
        slots.scheme[i] = int8
    if slots.bytes() > budget:
        where = f"layer {layer_ids[0]}" if len(layer_ids) == 1 else "the model"
        raise RQError(f"{where}: the paper strategy needs {slots.bytes()} bytes (every expert and the replica "
                      f"in int8), budget is {budget}", hint="raise --budget or use --strategy greedy")
    return slots.layouts()


@_register("paper", enforces_budget=True)
def paper(load, error, schemes, nbytes, budget, opt: PlanOptions, global_budget: bool, layer_ids) -> Layouts:
    """The R&Q paper: replicate each layer's heaviest expert once in int8; quantize the least important to int8 to fit.

    Fixed setting: the options' caps and ``max_error`` do not apply; a layer without tokens gets no
    replica. A budget that cannot hold every slot in int8 raises ``RQError``.
    """
    if "int8" not in schemes:
        raise RQError(f"the paper strategy quantizes to int8, which is not among the offered schemes "
                      f"({', '.join(schemes)})")
    int8 = list(schemes).index("int8")
    L, ids = load.shape[0], list(layer_ids)
    if global_budget:
        return _paper_group(load, error, nbytes, int(budget), int8, ids)
    out: Layouts = []
    for l in range(L):
        out += _paper_group(load[l:l + 1], error[l:l + 1], nbytes, int(budget[l]), int8, ids[l:l + 1])
    return out


def make_plan(load: torch.Tensor, error: torch.Tensor, schemes: Sequence[str], scheme_bytes: torch.Tensor,
              budget_bytes: torch.Tensor | int, options: PlanOptions = PlanOptions(), global_budget: bool = False,
              layer_ids: Sequence[int] | None = None) -> Plan:
    """Plan replicas and storage schemes for every MoE layer.

    ``load [L, E]`` routed token-slots per expert (zeros allowed); ``error [L, E, S]`` predicted
    damage of storing all of expert e's tokens in scheme s (0 for ``s == 0``); ``schemes [S]``
    names, index 0 the source; ``scheme_bytes [S]`` stored bytes of one expert per scheme;
    ``budget_bytes``: ``[L]`` per-layer budgets (an int is used for every layer), or the model's
    total when ``global_budget``. ``layer_ids [L]``: model layer numbers, for messages and
    ``LayerPlan.layer`` (default ``0..L-1``). Raises ``RQError`` for bad inputs, an unknown
    strategy, or a budget below ``E * min(scheme_bytes)`` bytes (checked before planning).
    """
    if options.strategy not in STRATEGIES:
        raise RQError(f"unknown strategy {options.strategy!r}; known: {', '.join(STRATEGIES)}")
    load = torch.as_tensor(load).double().cpu()
    error = torch.as_tensor(error).double().cpu()
    nbytes = torch.as_tensor(scheme_bytes, dtype=torch.int64).cpu()
    if load.dim() != 2:
        raise RQError(f"load must be [layers, experts], got shape {tuple(load.shape)}")
    L, E = load.shape
    S = len(schemes)
    if tuple(error.shape) != (L, E, S) or tuple(nbytes.shape) != (S,):
        raise RQError(f"planner inputs disagree: load {tuple(load.shape)}, error {tuple(error.shape)}, "
                      f"{S} schemes, scheme_bytes {tuple(nbytes.shape)}")
    if not (torch.isfinite(load).all() and torch.isfinite(error).all()) or (load < 0).any() or (error < 0).any():
        raise RQError("planner inputs must be finite and non-negative (load and error)")
    if S == 0 or (nbytes <= 0).any():
        raise RQError(f"scheme_bytes must be positive, got {nbytes.tolist()}")
    ids = list(range(L)) if layer_ids is None else [int(i) for i in layer_ids]
    assert len(ids) == L, "layer_ids must name every layer"
    if global_budget:
        budget = int(budget_bytes)
        per_layer = None
    else:
        budget = torch.as_tensor(budget_bytes, dtype=torch.int64)
        if budget.dim() > 1 or budget.numel() not in (1, L):
            raise RQError(f"per-layer budget must be one number or [{L}] numbers, got shape {tuple(budget.shape)}")
        budget = per_layer = budget.reshape(-1).expand(L).clone()
    fn = STRATEGIES[options.strategy]
    if fn.enforces_budget:
        _check_feasible(budget, global_budget, E, nbytes, schemes, ids)
    layouts = fn(load, error, list(schemes), nbytes, budget, options, global_budget, ids)
    layers = []
    for l, (phy2log, slot_scheme) in enumerate(layouts):
        pred = predict_layer(load[l], error[l], nbytes, phy2log, slot_scheme)
        check_layer(phy2log, slot_scheme, pred["logcnt"], pred["log2phy"], S)
        layers.append(LayerPlan(layer=ids[l], phy2log=phy2log, slot_scheme=slot_scheme,
                                budget_bytes=None if per_layer is None else int(per_layer[l]), **pred))
        if fn.enforces_budget and per_layer is not None:
            assert layers[-1].bytes_after <= int(per_layer[l]), f"layer {ids[l]} over budget"
    plan = Plan(layers=tuple(layers), schemes=tuple(schemes), scheme_bytes=tuple(int(b) for b in nbytes),
                options=options, global_budget=global_budget,
                budget_bytes=budget if global_budget else int(budget.sum()))
    if fn.enforces_budget and global_budget:
        assert plan.bytes_after <= budget, "model over budget"
    return plan


def _check_feasible(budget, global_budget: bool, E: int, nbytes, schemes, ids) -> None:
    cheapest = int(torch.argmin(nbytes))
    if global_budget:
        need = len(ids) * E * int(nbytes[cheapest])
        if budget < need:
            raise RQError(f"all layers: budget {budget} bytes is below the {need} bytes needed to store "
                          f"{len(ids)} x {E} experts in {schemes[cheapest]}")
        return
    need = E * int(nbytes[cheapest])
    for l, b in zip(ids, budget.tolist()):
        if b < need:
            raise RQError(f"layer {l}: budget {b} bytes is below the {need} bytes needed to store "
                          f"its {E} experts in {schemes[cheapest]}")


assert set(STRATEGIES) == set(defaults.STRATEGIES), "update defaults.STRATEGIES (the CLI offers those)"
