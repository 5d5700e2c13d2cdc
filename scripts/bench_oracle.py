"""How good can a static layout be on the bundled model's held-out steps? rq vs an in-sample oracle vs lower bounds.

The held-out steps are exactly those of ``scripts/bench_balance.py``'s model section (the corpus's
held-out split, ``per_step`` = 8 sequences per step, 64 steps drawn by ``sample_steps`` with the
same seed, mixed and single-domain), scored the same way: per step the device max/mean of each
MoE layer under load-aware dispatch (``rq_tool.plan.steps``, i.e. ``kernels/split.py``), averaged
over the layers, then over the steps. EP8, ``P`` slots per layer (``P / G`` per device, every slot
used, copies of one expert on distinct devices), for each ``P`` in ``--slots``.

Columns, per step set (mixed, then each domain), and the worst domain:

- ``original``: standard EP, no copies. ``rq (...)``: ``plan_balance`` (the ``rq plan --engine rq``
  path, load-aware, ``fill_all``) calibrated on the bundled ``mix`` set and on the training-split
  sample, as in bench_balance (the figures the issue-13 targets are checked on).
- ``oracle joint``: ONE static layout planned **on the scored single-domain held-out steps
  themselves** (in-sample, hindsight: not a deployable plan) to minimise the worst domain's figure;
  its mixed figure is reported as it falls. Search: per layer, start from the best of rq's own
  candidate layouts (``CANDIDATES`` of ``rq_tool.plan.balance``, planned on the pooled steps'
  mean load), the two rq plans and the per-set oracles below; hill-climb (best improving
  neighbour until none) with two moves -- swap the devices of two slots, re-point a replica slot
  to another expert -- on ``max over domains`` of that layer's score; ``--kicks`` times perturb
  the best by ``--kick-moves`` random moves and climb again; then one pass of coordinate descent
  on the reported quantity (the layer mean, the other layers fixed). Every score is the exact
  load-aware dispatch on the scored steps. A local optimum: an upper bound on what the best
  static layout reaches on these steps, not a proof of it.
- ``oracle (own set)``: the same search for each step set alone (a different layout per set).
- ``LB counts``: a lower bound for **any** static layout with ``P`` slots and **any** split of each
  expert's pairs over its copies (ideal, fractional): a layout gives expert e some ``c_e`` copies
  on distinct devices (``1 <= c_e <= G``, ``sum c_e <= P``), and in a step with counts ``n`` (total
  ``T``) its busiest device carries at least ``max(T / G, max_e n_e / c_e)``. The copy counts are
  the same in every step, so ``min over c of mean over steps of max(1, G max_e n_e / (c_e T))``
  bounds the set's figure from below (per layer, then the layer mean). Exact minimum by
  enumeration: experts whose load never exceeds the mean device load contribute at most 1 with
  one copy, so only the others ("hot") are enumerated (``count_bound_table``).
- Below each table, the same bound for one layout serving every domain at once: for weights
  ``w`` over the domains, ``worst domain >= sum_d w_d figure_d``, which splits over the layers and
  is minimised over each layer's copy counts exactly; the best ``w`` of a multiplicative-weights
  search is reported (every ``w`` is sound), and likewise for ``max(mixed / 1.10, worst domain /
  1.25)`` (<= 1 would be needed to meet both issue-13 targets).

The bounds ignore placement (which experts share a device, fixed while the hot experts change
from step to step) and assume an ideal split; the gap to the oracle is what those cost.

    OMP_NUM_THREADS=2 python scripts/bench_oracle.py [--slots 24 32 48] [--out bench_oracle.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before torch is imported

import argparse
import json
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_balance import G_MODEL, calibration_sets, seq_loads_of  # noqa: E402
from rq_tool import defaults  # noqa: E402
from rq_tool.plan.balance import CANDIDATES, Layout, _weight, candidate_layout, plan_balance  # noqa: E402
from rq_tool.plan.steps import contiguous_layout, sample_steps, step_max_mean  # noqa: E402

NUM_STEPS = 64  # as rq_tool.eval.ep.per_step_balance
TARGET_MIXED, TARGET_SINGLE = 1.10, 1.25  # issue 13


# ---------------------------------------------------------------------------- loads
def load_all(args, log):
    """``held {domain: [N, L, E]}``, ``cals {name: (seq_loads, domain, names)}`` (profiled, or ``--loads``)."""
    if args.loads and os.path.exists(args.loads):
        d = torch.load(args.loads)
        log(f"loads from {args.loads}")
        return d["held"], d["cals"]
    from rq_tool.eval.heldout import load_heldout
    from rq_tool.source import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(None)
    tokenizer = load_tokenizer(path)
    model, family = load_model(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heldout = load_heldout(tokenizer, max_tokens=args.heldout_tokens)
        held = {d: seq_loads_of(model, family, ids, 8) for d, ids in heldout.domains.items()}
        cals = calibration_sets(tokenizer, model, family, args)
    log("held-out: " + ", ".join(f"{d} {x.shape[0]} seqs" for d, x in held.items()))
    if args.loads:
        torch.save({"held": held, "cals": cals}, args.loads)
    return held, cals


def step_sets(held, per_step, seed):
    """``{name: counts [B, L, E]}``: the steps ``per_step_balance`` scores (same draws, same seed)."""
    names = list(held)
    pooled = torch.cat([held[d] for d in names])
    return {n: sample_steps(x, per_step, NUM_STEPS, seed) for n, x in [("mixed", pooled)] + [(d, held[d]) for d in names]}


def score(steps, lay: Layout, G) -> torch.Tensor:
    """``[L]`` mean over the steps of each layer's load-aware device max/mean."""
    return step_max_mean(steps, lay.phy2log, lay.slot_device, G, "load-aware").mean(0)


# ---------------------------------------------------------------------------- lower bounds
def _combos(K: int, top: int, extra: int) -> torch.Tensor:
    """``[C, K]`` every copy-count vector with ``1 <= c_k <= top`` and ``sum (c_k - 1) <= extra``."""
    out = torch.zeros(1, 0, dtype=torch.int64)
    for _ in range(K):
        v = torch.arange(top)
        out = torch.cat([out.repeat_interleave(top, 0), v.repeat(out.shape[0])[:, None]], 1)
        out = out[out.sum(1) <= extra]
    return out + 1


def _num_combos(K: int, top: int, extra: int) -> int:
    ways = [1] + [0] * extra  # ways[s]: vectors so far with sum (c - 1) = s
    for _ in range(K):
        ways = [sum(ways[s - v] for v in range(min(top, s + 1))) for s in range(extra + 1)]
    return sum(ways)


def count_bound_table(sets: list[torch.Tensor], P: int, G: int, max_combos: int = 600_000):
    """Per layer, every copy-count vector's score on every step set: ``[(V [C, S], exact)]``, one per layer.

    ``V[c, s]`` = mean over the steps of set s of ``max(1, G max_e n_e / (c_e T))`` (the module
    docstring's ``LB counts`` before the minimum over c). The experts enumerated are the hot ones of
    any set (share above ``1 / G`` in some step), heaviest first; if their vectors are more than
    ``max_combos``, only the heaviest that fit are kept and the others left out of the max (still a
    lower bound, ``exact`` False)."""
    B = [s.shape[0] for s in sets]
    steps = torch.cat(sets).double()  # [sum B, L, E]
    _, L, E = steps.shape
    a = G * steps / steps.sum(-1, keepdim=True).clamp_min(1e-300)
    extra, top = P - E, min(G, 1 + P - E)
    seg = torch.repeat_interleave(torch.arange(len(sets)), torch.tensor(B))
    out = []
    for l in range(L):
        peak = a[:, l].amax(0)
        hot = torch.argsort(peak, descending=True)[: int((peak > 1).sum())]
        K = hot.numel()
        while K and _num_combos(K, top, extra) > max_combos:
            K -= 1
        c = _combos(K, top, extra).double()  # [C, K]
        ah = a[:, l, hot[:K]]  # [sum B, K]
        V = []
        for part in c.split(1 << 12):
            v = (ah[None] / part[:, None]).amax(-1).clamp(min=1.0) if K else torch.ones(1, ah.shape[0])
            V.append(torch.zeros(v.shape[0], len(sets), dtype=torch.float64).index_add_(1, seg, v) / torch.tensor(B))
        out.append((torch.cat(V), K == hot.numel()))
    return out


def weighted_bound(tables, norm: torch.Tensor, iters: int = 60) -> float:
    """A lower bound on ``min over layouts of max_s (set s's score / norm_s)`` for the layer-mean score.

    For weights ``w >= 0`` summing to 1, ``max_s x_s >= sum_s w_s x_s``, and the weighted sum splits
    over the layers, each minimised over its copy counts (``tables``); every ``w`` gives a sound
    bound, so the best of a multiplicative-weights search (starting uniform) is reported."""
    S = norm.numel()
    w = torch.full((S,), 1.0 / S, dtype=torch.float64)
    best = 0.0
    for _ in range(iters):
        per = [V[((V / norm) @ w).argmin()] for V, _ in tables]
        f = torch.stack(per).mean(0) / norm  # [S] the layer-mean of each set at the weighted optimum
        best = max(best, float(f @ w))
        w = w * torch.exp(2.0 * (f - f.max()))
        w = w / w.sum()
    return best


# ---------------------------------------------------------------------------- oracle
def _neighbours(ex: torch.Tensor, dv: torch.Tensor, E: int, G: int):
    """All one-move neighbours of one layer's layout ``ex, dv [P]`` -> ``(ex [K, P], dv [K, P])``:
    swap the devices of two slots (different experts, different devices, no expert twice on a
    device), or re-point a slot of an expert with several copies to an expert its device lacks."""
    P = ex.numel()
    held = torch.zeros(E, G, dtype=torch.bool)
    held[ex, dv] = True
    cnt = torch.bincount(ex, minlength=E)
    i, j = torch.triu_indices(P, P, 1)
    ok = (dv[i] != dv[j]) & (ex[i] != ex[j]) & ~held[ex[i], dv[j]] & ~held[ex[j], dv[i]]
    i, j = i[ok], j[ok]
    sw_dv = dv.repeat(i.numel(), 1)
    r = torch.arange(i.numel())
    sw_dv[r, i], sw_dv[r, j] = dv[j], dv[i]
    sw_ex = ex.repeat(i.numel(), 1)
    s, e = torch.meshgrid(torch.arange(P), torch.arange(E), indexing="ij")
    s, e = s.flatten(), e.flatten()
    ok = (cnt[ex[s]] > 1) & (e != ex[s]) & ~held[e, dv[s]]
    s, e = s[ok], e[ok]
    rp_ex = ex.repeat(s.numel(), 1)
    rp_ex[torch.arange(s.numel()), s] = e
    return torch.cat([sw_ex, rp_ex]), torch.cat([sw_dv, dv.repeat(s.numel(), 1)])


class Objective:
    """One layer's score of candidate layouts on several step sets: ``max_s (offset_s + scale * mean
    over set s's steps of the load-aware max/mean) / norm_s`` (one set, norm 1, no offset: its mean)."""

    def __init__(self, sets_l: list[torch.Tensor], norm, G: int, offset=None, scale: float = 1.0):
        self.steps = torch.cat(sets_l)  # [sum B, E]
        self.B = torch.tensor([x.shape[0] for x in sets_l], dtype=torch.float64)
        self.seg = torch.repeat_interleave(torch.arange(len(sets_l)), self.B.long())
        self.norm = torch.as_tensor(norm, dtype=torch.float64)
        self.offset = torch.zeros(len(sets_l), dtype=torch.float64) if offset is None else offset
        self.scale = scale  # with ``offset``: the other layers' part of the layer mean (``oracle``)
        self.G = G

    def per_set(self, ex: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
        """``ex, dv [K, P]`` -> ``[K, S]`` each set's mean max/mean."""
        K = ex.shape[0]
        r = step_max_mean(self.steps[:, None, :].expand(-1, K, -1), ex, dv, self.G, "load-aware")  # [sum B, K]
        return torch.zeros(len(self.B), K, dtype=torch.float64).index_add_(0, self.seg, r).T / self.B

    def __call__(self, ex, dv, chunk: int = 256) -> torch.Tensor:
        return torch.cat([((self.offset + self.scale * self.per_set(a, b)) / self.norm).amax(-1)
                          for a, b in zip(ex.split(chunk), dv.split(chunk))])


def climb(obj: Objective, ex, dv, E):
    """Best-improvement hill climb from ``ex, dv [P]`` -> ``(ex, dv, score)``."""
    cur = float(obj(ex[None], dv[None])[0])
    while True:
        n_ex, n_dv = _neighbours(ex, dv, E, obj.G)
        if n_ex.shape[0] == 0:
            return ex, dv, cur
        sc = obj(n_ex, n_dv)
        k = int(sc.argmin())
        if float(sc[k]) >= cur - 1e-9:
            return ex, dv, cur
        ex, dv, cur = n_ex[k], n_dv[k], float(sc[k])


def oracle_layer(obj: Objective, starts, E, kicks: int, kick_moves: int, gen):
    """Best layout found for one layer: the best start, climbed, then ``kicks`` perturb-and-climb rounds."""
    scored = [(float(obj(ex[None], dv[None])[0]), ex, dv) for ex, dv in starts]
    _, ex, dv = min(scored, key=lambda t: t[0])
    best = climb(obj, ex, dv, E)
    for _ in range(kicks):
        if best[2] <= float(((obj.offset + obj.scale) / obj.norm).max()) + 1e-9:  # all at 1.0: nothing to gain
            break
        ex, dv = best[0], best[1]
        for _ in range(kick_moves):
            n_ex, n_dv = _neighbours(ex, dv, E, obj.G)
            k = int(torch.randint(n_ex.shape[0], (1,), generator=gen))
            ex, dv = n_ex[k], n_dv[k]
        cand = climb(obj, ex, dv, E)
        if cand[2] < best[2] - 1e-9:
            best = cand
    return best


def start_layouts(steps, P, G, original: Layout, extra: list[Layout]) -> list[Layout]:
    """rq's candidate layouts planned on the mean of ``steps [B, L, E]`` (in-sample), plus ``extra``."""
    B, L, E = steps.shape
    idx = torch.arange(B)
    out = []
    for kind in CANDIDATES:
        w = _weight(steps, idx, kind)
        flag = lambda k: torch.full((L,), kind == k)  # noqa: E731
        out.append(candidate_layout(w, torch.full((L,), P), G, "load-aware", fill_all=True, spread=flag("spread"),
                                    pin=flag("pinned"), pin_dev=original.slot_device[:, :E], packed=flag("packed"),
                                    tight=flag("tight")))
    return out + extra


def oracle(sets: list[torch.Tensor], norm, P, G, original, extra, args) -> Layout:
    """The oracle layout (module docstring) for the step sets ``sets [B_s, L, E]``: per layer the
    best found for ``max_s score_s / norm_s``, from rq's candidates planned on all their steps' mean
    and the layouts ``extra``; with several sets, then one pass of coordinate descent on the
    reported quantity, ``max_s (layer mean of score_s) / norm_s``: each layer climbed again with
    the other layers' scores fixed."""
    L, E = sets[0].shape[1:]
    starts = start_layouts(torch.cat(sets), P, G, original, extra)
    gen = torch.Generator().manual_seed(args.seed)
    ex_l, dv_l = [], []
    for l in range(L):
        st = []
        for lay in starts:
            ex, dv = lay.layer(l)
            if ex.numel() == P and bool((torch.bincount(dv, minlength=G) == P // G).all()):
                st.append((ex, dv))
        ex, dv, _ = oracle_layer(Objective([x[:, l] for x in sets], norm, G), st, E, args.kicks, args.kick_moves, gen)
        ex_l.append(ex)
        dv_l.append(dv)
    if len(sets) > 1:
        per = torch.stack([Objective([x[:, l] for x in sets], norm, G).per_set(ex_l[l][None], dv_l[l][None])[0]
                           for l in range(L)])  # [L, S]
        for l in range(L):
            obj = Objective([x[:, l] for x in sets], norm, G, offset=(per.sum(0) - per[l]) / L, scale=1.0 / L)
            ex_l[l], dv_l[l], _ = climb(obj, ex_l[l], dv_l[l], E)
            per[l] = obj.per_set(ex_l[l][None], dv_l[l][None])[0]
    return Layout(torch.stack(ex_l), torch.stack(dv_l))


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_oracle.json")
    ap.add_argument("--slots", type=int, nargs="+", default=[24, 32, 48], help="slots per layer (multiples of 8)")
    ap.add_argument("--num-samples", type=int, default=defaults.NUM_SAMPLES, help="calibration sequences")
    ap.add_argument("--heldout-tokens", type=int, default=64 * defaults.SEQ_LEN, help="held-out tokens per domain")
    ap.add_argument("--kicks", type=int, default=0, help="perturb-and-climb rounds per layer after the first climb")
    ap.add_argument("--kick-moves", type=int, default=3, help="random moves per perturbation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loads", default=None, help="cache file for the profiled loads (read if present, else written)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    held, cals = load_all(args, log)
    G, b = G_MODEL, defaults.SEQS_PER_STEP
    L, E = next(iter(held.values())).shape[1:]
    original = Layout(*contiguous_layout(L, E, G))
    sets = step_sets(held, b, args.seed)
    names = list(sets)  # "mixed", then the domains
    doms = names[1:]
    norm_t = torch.tensor([TARGET_MIXED] + [TARGET_SINGLE] * len(doms), dtype=torch.float64)
    res = {"ep": G, "per_step": b, "steps": NUM_STEPS, "experts": E, "layers": L, "targets":
           {"mixed": TARGET_MIXED, "single": TARGET_SINGLE}, "slots": {}}
    for P in args.slots:
        assert P % G == 0 and P >= E, "slots per layer: a multiple of G, at least E"
        t1 = time.perf_counter()
        rq = {c: plan_balance(seq, G, P, original, policy="load-aware", per_step=b, groups=dom, group_names=names_,
                              fill_all=True).layout for c, (seq, dom, names_) in cals.items()}
        cols = {"original": original, **{f"rq ({c})": lay for c, lay in rq.items()}}
        # per-set oracles: each set alone, in-sample
        own = {n: oracle([sets[n]], [1.0], P, G, original, list(rq.values()), args) for n in names}
        # joint oracles: one layout for every set, in-sample
        extra = list(rq.values()) + list(own.values())
        cols["oracle joint"] = oracle([sets[n] for n in doms], [1.0] * len(doms), P, G, original, extra, args)
        figs = {c: {n: float(score(sets[n], lay, G).mean()) for n in names} for c, lay in cols.items()}
        figs["oracle (own set)"] = {n: float(score(sets[n], own[n], G).mean()) for n in names}
        tables = count_bound_table([sets[n] for n in names], P, G)
        lb = {n: float(torch.stack([V[:, i].min() for V, _ in tables]).mean()) for i, n in enumerate(names)}
        lb_joint = {"targets": weighted_bound(tables, norm_t),
                    "worst domain": weighted_bound([(V[:, 1:], ex) for V, ex in tables],
                                                   torch.ones(len(doms), dtype=torch.float64))}
        res["slots"][P] = {"figures": figs, "lb_counts": lb, "lb_joint": lb_joint,
                           "lb_exact": all(ex for _, ex in tables), "seconds": time.perf_counter() - t1,
                           "joint_copies": [torch.bincount(cols["oracle joint"].phy2log[l], minlength=E).tolist()
                                            for l in range(L)]}
        log(f"P={P}: done in {time.perf_counter() - t1:.0f}s")
    res["seconds"] = time.perf_counter() - t0
    print(markdown(res, names))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out} ({res['seconds']:.0f}s)")


def markdown(res, names) -> str:
    lines = []
    for P, r in res["slots"].items():
        figs = r["figures"]
        cols = list(figs)
        lines += [f"### Bundled model, EP{res['ep']}, {P} slots per layer, held-out steps of {res['per_step']} "
                  "sequences, load-aware dispatch", "",
                  "| steps | " + " | ".join(cols) + " | LB counts |", "|---" * (len(cols) + 2) + "|"]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{figs[c][n]:.3f}" for c in cols) + f" | {r['lb_counts'][n]:.3f} |")
        worst = {c: max(figs[c][n] for n in names[1:]) for c in cols}
        lines.append("| worst domain | " + " | ".join(f"{worst[c]:.3f}" for c in cols) + " | - |")
        lines += ["", f"any static layout with {P} slots (copy-count bound"
                  + ("" if r["lb_exact"] else ", some hot experts left out") + "): worst domain >= "
                  f"{r['lb_joint']['worst domain']:.3f}; max(mixed / {res['targets']['mixed']}, worst domain / "
                  f"{res['targets']['single']}) >= {r['lb_joint']['targets']:.3f}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
