"""Per-step, shift-robust replica planning: the layout that keeps the busiest device light on traffic
that was *not* calibrated on.

Legend: N calibration sequences (or chunks), L MoE layers, E logical experts, P physical slots,
G devices, B steps, F folds (held-out domains or clusters), C candidate layouts.

Objective: the device-level max/mean **per step** (``per_step`` sequences summed, steps resampled
from the calibration sequences, ``rq_tool.plan.steps``), under the dispatch policy the layout will
run with. Candidates (replicas and devices chosen jointly, ``rq_tool.plan.layout``):

- ``mean``: planned on the mean load; ``shrunk``: on half the mean load share and half uniform
  (hedges against a shifted mix); for ``load-aware`` dispatch the level fill (``fill_layout``),
  for ``round-robin`` even splits the greedy copies + LPT placement (``build_layout``);
- ``pinned``: the original layout's experts where they are, plus copies into the room left (with
  load-aware dispatch never busier than the original); ``spread``: at most ``ceil(E / G)``
  originals per device; ``packed``: greedy copies + LPT placement under either policy;
  ``tight``: the level fill for few slots per device (at most ``ceil(whole / G)`` unsplit experts
  per device, split experts wrapped McNaughton-style into the slots left; ``fill_layout(tight=)``);
  ``star``: the tight fill with split experts' remainders best-fit into devices whose last slot they
  take, so split experts seldom share a device (the load-aware split balances such stars in a few
  Gauss-Seidel rounds, the tight fill's chains only over many; ``fill_layout(star=)``);
- ``original``: the layout the deployment would have without rq (standard EP, or the engine's
  identity + round-robin redundancy).

Robustness: the calibration sequences are split into folds (their domain tags, else k-means
clusters of their load shares); every candidate is planned without fold f and scored on steps of
fold f alone (held-out, single-domain). Per layer the candidate with the lowest worst-fold ratio
to the original wins (ties: the mean ratio, then the simpler candidate); the original scores 1.0
by definition, so on the calibration's own held-out folds the choice never does harm. With
load-aware dispatch and held-out folds, only ``pinned`` competes with the original: it keeps every
original on its device, so the dispatch can keep the original's assignment on any traffic, while
the other candidates can win every calibration fold and still lose on a domain no fold held
(measured on the bundled model, leave-one-domain-out of ``mix``, 8 sequences per step, EP8: with
the others allowed at a 5% margin, held-out math went 2.857 -> 2.942, one layer 3.545 -> 4.571
planned on the mean; pinned only: 2.839, and every held-out domain at or below the original;
mixed held-out 1.133 -> 1.118). The winner is then planned on all sequences. With fewer than two
folds (pooled or engine-recorded loads) every candidate is scored in-sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import build_layout, fill_layout
from .steps import POLICIES, contiguous_layout, sample_steps, spread, step_max_mean

CANDIDATES = ("pinned", "mean", "shrunk", "spread", "packed", "tight", "star")
FILL_ONLY = ("packed", "tight", "star")  # differ from ``mean`` only in the load-aware level fill
NUM_STEPS = 24  # steps scored per fold and candidate
MAX_FOLDS = 4


@dataclass
class Layout:
    """``phy2log [L, P]`` and ``slot_device [L, P]`` (-1 pad; slots 0..E-1 the originals)."""

    phy2log: torch.Tensor
    slot_device: torch.Tensor

    def layer(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.phy2log[l] >= 0
        return self.phy2log[l][keep], self.slot_device[l][keep]


@dataclass
class BalanceResult:
    layout: Layout
    choice: list[str]  # [L] candidate chosen per layer
    folds: list[str]  # fold names (held-out domains / clusters); empty: in-sample
    ratio: dict[str, list[list[float]]]  # candidate -> [F][L] held-out score / original's
    predicted: dict = field(default_factory=dict)


def _pad_stack(rows: list[torch.Tensor], fill: int = -1) -> torch.Tensor:
    P = max(r.numel() for r in rows)
    out = torch.full((len(rows), P), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def kmeans_folds(seq_loads: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """``seq_loads [N, L, E]`` -> ``[N]`` cluster ids in ``[0, k)`` of the sequences' load shares."""
    N = seq_loads.shape[0]
    x = seq_loads.double()
    x = (x / x.sum(-1, keepdim=True).clamp_min(1e-300)).reshape(N, -1)
    g = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(N, generator=g)[:k]].clone()
    assign = torch.zeros(N, dtype=torch.int64)
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(-1)
        for c in range(k):
            if (assign == c).any():
                centers[c] = x[assign == c].mean(0)
    return torch.unique(assign, return_inverse=True)[1]


def make_folds(seq_loads: torch.Tensor, groups: torch.Tensor | None, names=None, per_step: int = 8,
               seed: int = 0, rows_per_seq: int = 1) -> tuple[torch.Tensor | None, list[str]]:
    """Fold id per row ``[N]`` and fold names: domain tags when there are >= 2, else k-means
    clusters (up to ``MAX_FOLDS``, each at least one step's worth), else ``(None, [])``.

    ``rows_per_seq`` r: rows come r per calibration sequence (its chunks, in order); the k-means
    clusters whole sequences, so no sequence is both planned on and held out."""
    N = seq_loads.shape[0]
    if groups is not None and torch.unique(groups).numel() >= 2:
        ids, inv = torch.unique(groups, return_inverse=True)
        return inv, [str(names[int(i)]) if names is not None else f"group {int(i)}" for i in ids]
    k = min(MAX_FOLDS, N // max(per_step, 2))
    r = rows_per_seq if rows_per_seq > 1 and N % rows_per_seq == 0 else 1
    if k < 2 or N // r < 2:
        return None, []
    per_seq = seq_loads.reshape(N // r, r, *seq_loads.shape[1:]).sum(1)
    fold = kmeans_folds(per_seq, min(k, N // r), seed).repeat_interleave(r)
    return fold, [f"cluster {i}" for i in range(int(fold.max()) + 1)]


def _weight(seq_loads, idx, kind):
    w = seq_loads[idx].double().mean(0)  # [L, E]
    if kind in ("shrunk", "spread"):
        total = w.sum(-1, keepdim=True)
        w = 0.5 * w + 0.5 * total / w.shape[-1]
    return w


def candidate_layout(weight: torch.Tensor, num_slots: torch.Tensor, G: int, policy: str, *, first_size=None,
                     replica_size=None, capacity=None, fill_all: bool = False, spread=False, pin=False,
                     pin_dev=None, packed=False, tight=False, star=False) -> Layout:
    """Replicas + devices for planning loads ``weight [L, E]`` (see module docstring); the keyword
    tensors are per row. ``packed [L]`` rows use the greedy copies + LPT placement whatever the policy."""
    L, E = weight.shape
    packed = torch.as_tensor(packed).expand(L) | (policy != "load-aware")
    per_row = dict(first_size=first_size, replica_size=replica_size, capacity=capacity, spread=spread, pin=pin,
                   pin_dev=pin_dev, tight=torch.as_tensor(tight).expand(L) | torch.as_tensor(star).expand(L),
                   star=torch.as_tensor(star).expand(L))

    def sub(rows):
        return {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == L else v)
                for k, v in per_row.items()}

    parts = []
    for rows, use_fill in ((~packed).nonzero().flatten(), True), (packed.nonzero().flatten(), False):
        if rows.numel() == 0:
            continue
        kw = sub(rows)
        if use_fill:
            phy, dev, _, ok = fill_layout(weight[rows], num_slots[rows], G, kw["first_size"], kw["replica_size"],
                                          kw["capacity"], fill_all=fill_all, spread=kw["spread"], pin=kw["pin"],
                                          pin_dev=kw["pin_dev"], tight=kw["tight"], star=kw["star"])
        else:
            fs, rs = kw["first_size"], kw["replica_size"]
            size_fn = None if fs is None else (lambda p, fs=fs, rs=rs: _slot_sizes(p, fs, rs))
            phy, dev, ok = build_layout(weight[rows], num_slots[rows], G, size_fn, kw["capacity"], spread=kw["spread"],
                                        pin=kw["pin"], pin_dev=kw["pin_dev"])
        parts.append((rows, phy, dev, ok))
    P = max(p[1].shape[1] for p in parts)
    phy = torch.full((L, P), -1, dtype=torch.int64)
    dev = torch.full((L, P), -1, dtype=torch.int64)
    ok = torch.ones(L, dtype=torch.bool)
    for rows, ph, de, o in parts:
        phy[rows, : ph.shape[1]], dev[rows, : de.shape[1]], ok[rows] = ph, de, o
    if not bool(ok.all()):
        # a layer that does not fit: its originals alone on standard EP (always fits its share)
        o_phy, o_dev = contiguous_layout(L, E, G)
        P = max(phy.shape[1], E)
        phy = torch.cat([phy, torch.full((L, P - phy.shape[1]), -1, dtype=torch.int64)], 1)
        dev = torch.cat([dev, torch.full((L, P - dev.shape[1]), -1, dtype=torch.int64)], 1)
        bad = ~ok
        phy[bad], dev[bad] = -1, -1
        phy[bad, :E], dev[bad, :E] = o_phy[bad], o_dev[bad]
    return Layout(phy, dev)


def _rows(kinds, kind, L, K):
    """``[K * L]`` bool: rows (pair, layer) of candidate ``kind`` in the batched planning call."""
    return torch.tensor([k == kind for k in kinds]).repeat_interleave(L).repeat(K // len(kinds))


def _slot_sizes(phy2log, first_size, replica_size):
    L, P = phy2log.shape
    E = first_size.shape[1]
    e = phy2log.clamp(min=0)
    is_first = torch.arange(P)[None] < E
    return torch.where(is_first, first_size.gather(1, e), replica_size.gather(1, e)) * (phy2log >= 0)


def _merge(layouts: list[Layout], pick: list[int]) -> Layout:
    rows_p = [layouts[c].layer(l)[0] for l, c in enumerate(pick)]
    rows_d = [layouts[c].layer(l)[1] for l, c in enumerate(pick)]
    return Layout(_pad_stack(rows_p), _pad_stack(rows_d))


def plan_balance(seq_loads: torch.Tensor, num_devices: int, num_slots, original: Layout, *,
                 policy: str = "load-aware", per_step: int = 8, groups: torch.Tensor | None = None,
                 group_names=None, first_size=None, replica_size=None, capacity=None, fill_all: bool = False,
                 num_steps: int = NUM_STEPS, seed: int = 0, rows_per_seq: int = 1) -> BalanceResult:
    """Choose each layer's layout for the per-step objective, robust to held-out folds.

    ``seq_loads [N, L, E]`` per-sequence loads (N = 1: pooled only); ``num_slots [L]`` the most
    slots a layer may use; ``original``: the baseline layout; sizes/capacity: memory per slot and
    per device (see ``fill_layout``); ``fill_all``: every slot must be used (engines);
    ``rows_per_seq``: rows per calibration sequence (``make_folds``).
    """
    assert policy in POLICIES
    N, L, E = seq_loads.shape
    G = int(num_devices)
    num_slots = torch.as_tensor(num_slots, dtype=torch.int64).expand(L)
    fold, names = make_folds(seq_loads, groups, group_names, per_step, seed, rows_per_seq)
    # load-aware with held-out folds: only the pinned layout is safe on traffic no fold held (module docstring)
    cands = ("pinned",) if policy == "load-aware" and fold is not None else CANDIDATES
    if policy != "load-aware":  # every candidate is greedy copies + LPT: the fill-only ones are mean's twins
        cands = tuple(c for c in cands if c not in FILL_ONLY)
    C = len(cands) + 1  # + original
    all_idx = torch.arange(N)
    F = max(len(names), 1)
    # every (candidate, fold) pair is planned and scored in one batch: rows are (pair, layer)
    weights, steps, bases = [], [], []
    for f in range(F):
        train, test = (all_idx, all_idx) if fold is None else (all_idx[fold != f], all_idx[fold == f])
        st = sample_steps(seq_loads, per_step, num_steps, seed + f, pool=test) if N > 1 else seq_loads
        bases.append(step_max_mean(st, original.phy2log, original.slot_device, G, policy).mean(0))  # [L]
        steps.append(st)
        weights += [_weight(seq_loads, train, kind) for kind in cands]
    weights += [_weight(seq_loads, all_idx, kind) for kind in cands]  # the final candidates, same batch
    K = len(weights)
    rep = (lambda x: None if x is None else torch.as_tensor(x).repeat(K, *([1] * (torch.as_tensor(x).dim() - 1)))
           if torch.as_tensor(x).dim() else x)
    kw_all = dict(first_size=rep(first_size), replica_size=rep(replica_size),
                  capacity=None if capacity is None else torch.as_tensor(capacity, dtype=torch.float64).expand(L).repeat(K),
                  fill_all=fill_all, spread=_rows(cands, "spread", L, K), pin=_rows(cands, "pinned", L, K),
                  pin_dev=original.slot_device[:, :E].repeat(K, 1), packed=_rows(cands, "packed", L, K),
                  tight=_rows(cands, "tight", L, K), star=_rows(cands, "star", L, K))
    lay = candidate_layout(torch.cat(weights), num_slots.repeat(K), G, policy, **kw_all)
    B = min(st.shape[0] for st in steps)
    nc = F * len(cands) * L
    counts = torch.cat([steps[f][:B] for f in range(F) for _ in cands], dim=1)  # [B, F*C'*L, E]
    score = step_max_mean(counts, lay.phy2log[:nc], lay.slot_device[:nc], G, policy).mean(0)
    score = score.view(F, len(cands), L)
    ratio = torch.ones(C, F, L, dtype=torch.float64)
    ratio[:-1] = (score / torch.stack(bases)[:, None]).transpose(0, 1)
    worst, mean = ratio.amax(1), ratio.mean(1)  # [C, L]
    order = torch.arange(C, dtype=torch.float64)[:, None] * 1e-9  # ties: the earlier (simpler) candidate
    score = worst + 1e-6 * mean + order
    score[-1] = 1.0 + 1e-6 + order[-1]  # the original: ratio 1 on every fold
    pick = score.argmin(0).tolist()
    finals = [Layout(lay.phy2log[nc + c * L: nc + (c + 1) * L], lay.slot_device[nc + c * L: nc + (c + 1) * L])
              for c in range(len(cands))]
    layout = _merge(finals + [original], pick)
    names_c = list(cands) + ["original"]
    return BalanceResult(layout, [names_c[p] for p in pick], names,
                         {names_c[c]: ratio[c].tolist() for c in range(C)})


def predict_balance(seq_loads: torch.Tensor, layout: Layout, original: Layout, num_devices: int, *,
                    per_step: int = 8, groups: torch.Tensor | None = None, group_names=None,
                    num_steps: int = 64, seed: int = 1) -> dict:
    """Predicted per-step device max/mean, before (``original``) and after, with its spread.

    Mixed steps are drawn from every sequence, single-domain steps from each group alone.
    Returns ``{"per_step", "policies": {policy: {"mixed": {"before", "after"}, "domains": {name:
    {...}}}}}``, each a ``spread`` over steps of the layer-mean max/mean.
    """
    N = seq_loads.shape[0]
    G = int(num_devices)
    pools = {"mixed": None}
    if groups is not None and torch.unique(groups).numel() >= 2:
        for gid in torch.unique(groups).tolist():
            name = str(group_names[gid]) if group_names is not None else f"group {gid}"
            pools[name] = (groups == gid).nonzero().flatten()
    out = {"per_step": per_step, "sequences": N, "policies": {}}
    for policy in POLICIES:
        res = {}
        for name, pool in pools.items():
            steps = sample_steps(seq_loads, per_step, num_steps, seed, pool=pool) if N > 1 else seq_loads
            before = step_max_mean(steps, original.phy2log, original.slot_device, G, policy).mean(1)
            after = step_max_mean(steps, layout.phy2log, layout.slot_device, G, policy).mean(1)
            res[name] = {"before": spread(before), "after": spread(after)}
        out["policies"][policy] = res
    return out
