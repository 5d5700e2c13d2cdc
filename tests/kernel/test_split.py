"""Replica split policies (rq_tool.kernels.split): exact counts, optimal pours, load-aware <= round-robin."""

import itertools

import pytest
import torch
from kernel_cases import slot_maps

from rq_tool.kernels.split import _pour, assign_slots, load_aware_split, round_robin_split, split_counts


def _random_map(E, P, G, seed):
    g = torch.Generator().manual_seed(seed)
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)])
    logcnt, log2phy = slot_maps(phy2log, E)
    slot_device = torch.randperm(P, generator=g) % G
    return phy2log, log2phy, logcnt, slot_device


def test_pour_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        D = int(torch.randint(1, 5, (), generator=g))
        base = torch.randint(0, 10, (1, D), generator=g)
        n = torch.randint(0, 12, (1,), generator=g)
        add = _pour(base, n)
        assert int(add.sum()) == int(n) and (add >= 0).all()
        best = min(max((base[0] + torch.tensor(a)).tolist())
                   for a in itertools.product(range(int(n) + 1), repeat=D) if sum(a) == int(n))
        assert int((base + add).max()) == best


@pytest.mark.parametrize("E,P,G", [(4, 4, 2), (8, 12, 4), (16, 32, 8), (64, 80, 8)])
@pytest.mark.parametrize("policy", ["round-robin", "load-aware"])
def test_split_keeps_every_expert_count(E, P, G, policy):
    phy2log, log2phy, logcnt, dev = _random_map(E, P, G, seed=E + P)
    counts = torch.randint(0, 200, (6, E), generator=torch.Generator().manual_seed(1))
    sc = split_counts(policy, counts, log2phy, logcnt, dev, G)
    assert sc.shape == (6, P) and (sc >= 0).all()
    per_e = torch.zeros(6, E, dtype=torch.int64).scatter_add_(1, phy2log.expand(6, -1), sc)
    assert torch.equal(per_e, counts)


def test_round_robin_matches_dispatch_rule():
    phy2log, log2phy, logcnt, dev = _random_map(8, 14, 2, seed=3)
    counts = torch.tensor([[7, 0, 3, 11, 1, 2, 5, 9]])
    sc = round_robin_split(counts, log2phy, logcnt, 14)[0]
    for e in range(8):
        c = int(logcnt[e])
        for r in range(c):
            n = int(counts[0, e])
            assert int(sc[log2phy[e, r]]) == n // c + (r < n % c)


def test_load_aware_never_busier_than_round_robin_on_average():
    wins = 0
    for seed in range(30):
        phy2log, log2phy, logcnt, dev = _random_map(16, 32, 8, seed)
        counts = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(seed)) ** 2 // 50
        def dmax(sc):
            return torch.zeros(4, 8, dtype=torch.int64).scatter_add_(1, dev.expand(4, -1), sc).max(1).values
        la, rr = dmax(load_aware_split(counts, log2phy, logcnt, dev, 8)), dmax(round_robin_split(counts, log2phy, logcnt, 32))
        wins += int((la <= rr).all())
    assert wins >= 27


def test_assign_slots_realises_the_split():
    phy2log, log2phy, logcnt, dev = _random_map(16, 24, 4, seed=5)
    topk = torch.randint(0, 16, (50, 2), generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(topk.flatten(), minlength=16).view(1, -1)
    sc = load_aware_split(counts, log2phy, logcnt, dev, 4)[0]
    phy = assign_slots(topk, log2phy, logcnt, sc)
    assert torch.equal(torch.bincount(phy.flatten(), minlength=24), sc)
    assert torch.equal(phy2log[phy], topk)


def _brute_min_max(counts, devsets, fixed, G):
    """Least device max over every integer split of ``counts[e]`` over ``devsets[e]``, on ``fixed [G]``."""
    def splits(n, k):
        return [a for a in itertools.product(range(n + 1), repeat=k) if sum(a) == n]
    best = None
    for combo in itertools.product(*(splits(int(n), len(d)) for n, d in zip(counts, devsets))):
        load = list(fixed)
        for a, d in zip(combo, devsets):
            for x, g in zip(a, d):
                load[g] += x
        best = max(load) if best is None else min(best, max(load))
    return best


def test_load_aware_split_is_min_max_on_star_layouts():
    # replicated experts on disjoint device sets, each beside single-slot experts ("stars", what the
    # planner's star fill builds): every pour is then the exact min-max, in the first pass
    g = torch.Generator().manual_seed(4)
    for trial in range(40):
        G = int(torch.randint(3, 6, (), generator=g))
        perm = torch.randperm(G, generator=g).tolist()
        cuts = sorted(torch.randperm(G - 1, generator=g)[: int(torch.randint(0, 3, (), generator=g))].add(1).tolist())
        groups = [perm[a:b] for a, b in zip([0] + cuts, cuts + [G])]
        multi = [grp for grp in groups if len(grp) >= 2]
        E_s = int(torch.randint(1, 5, (), generator=g))
        phy2log, slot_device = [], []
        for i, grp in enumerate(multi):
            phy2log += [i] * len(grp)
            slot_device += grp
        for j in range(E_s):
            phy2log.append(len(multi) + j)
            slot_device.append(int(torch.randint(0, G, (), generator=g)))
        E = len(multi) + E_s
        phy2log, slot_device = torch.tensor(phy2log), torch.tensor(slot_device)
        logcnt, log2phy = slot_maps(phy2log, E)
        counts = torch.randint(0, 9, (1, E), generator=g)
        sc = load_aware_split(counts, log2phy, logcnt, slot_device, G, rounds=0)
        got = int(torch.zeros(G, dtype=torch.int64).index_add_(0, slot_device, sc[0]).max())
        single = phy2log >= len(multi)
        fixed = torch.zeros(G, dtype=torch.int64).index_add_(0, slot_device[single], counts[0, phy2log[single]])
        assert got == _brute_min_max(counts[0, : len(multi)].tolist(), multi, fixed.tolist(), G), trial
