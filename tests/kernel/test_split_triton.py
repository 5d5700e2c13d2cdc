"""The Triton replica-split and slot-assignment kernels vs their torch references (kernels/split.py):
exact index equality over many shapes, under TRITON_INTERPRET=1 on CPU (real kernels on CUDA)."""

import pytest
import torch

from rq_tool.kernels.backend import interpreter_usable, triton_available
from rq_tool.kernels.split import assign_slots, load_aware_split, round_robin_split

pytestmark = pytest.mark.skipif(
    not triton_available() or not (torch.cuda.is_available() or interpreter_usable()),
    reason="needs triton with CUDA or TRITON_INTERPRET=1 set before import")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _random_map(E, extra, G, gen, spread=True):
    """Slots 0..E-1 the originals, ``extra`` replicas of random experts, each slot on a random device
    (``spread=False``: every slot of an expert on one device, the degenerate case)."""
    phy2log = torch.cat([torch.arange(E), torch.randint(0, E, (extra,), generator=gen)])
    logcnt = torch.bincount(phy2log, minlength=E)
    log2phy = torch.full((E, max(int(logcnt.max()), 1)), -1, dtype=torch.int64)
    for e in range(E):
        s = (phy2log == e).nonzero().flatten()
        log2phy[e, : s.numel()] = s
    dev = torch.randint(0, G, (phy2log.numel(),), generator=gen)
    if not spread:
        dev = dev[phy2log]
    return log2phy.to(DEV), logcnt.to(DEV), dev.to(DEV)


# (E, extra replicas, G, B rows). The interpreter runs the water-filling loop (replicated experts x
# (1 + rounds) passes) as numpy calls, ~5 ms each, and the kernel always runs every pass: the grid
# runs at GRID_ROUNDS on both sides, the default _ROUNDS on small shapes only; the wide shapes are
# slow-marked (they still run in CI).
SHAPES = [(1, 0, 1, 1), (2, 3, 2, 1), (4, 2, 2, 2), (8, 8, 4, 3), (16, 8, 8, 1), (16, 32, 4, 2), (33, 11, 3, 2)]
WIDE = [(64, 64, 8, 1), (64, 16, 16, 2), (128, 64, 8, 1)]
SMALL = [(4, 2, 2, 2), (8, 4, 4, 1)]
SCALES = [0, 3, 1000, 100_000]
GRID_ROUNDS = 3


@pytest.mark.parametrize("E,extra,G,B", SHAPES)
@pytest.mark.parametrize("scale", SCALES)
def test_load_aware_split_matches_reference(E, extra, G, B, scale):
    _check_load_aware(E, extra, G, B, scale, GRID_ROUNDS)


@pytest.mark.parametrize("E,extra,G,B", SMALL)
def test_load_aware_split_default_rounds(E, extra, G, B):
    _check_load_aware(E, extra, G, B, 1000, None)


@pytest.mark.slow
@pytest.mark.parametrize("E,extra,G,B", WIDE)
def test_load_aware_split_wide(E, extra, G, B):
    _check_load_aware(E, extra, G, B, 3, GRID_ROUNDS)


def _check_load_aware(E, extra, G, B, scale, rounds):
    """Both implementations at ``rounds`` Gauss-Seidel passes (``None``: each one's default)."""
    from rq_tool.kernels.split_triton import load_aware_split_triton

    kw = {} if rounds is None else {"rounds": rounds}
    gen = torch.Generator().manual_seed(E * 7 + extra * 3 + G + B + scale)
    for spread in (True, False):
        log2phy, logcnt, dev = _random_map(E, extra, G, gen, spread)
        counts = torch.randint(0, scale + 1, (B, E), generator=gen).to(DEV)
        if scale == 3:  # many ties
            counts[:, : E // 2] = 2
        want = load_aware_split(counts, log2phy, logcnt, dev, G, **kw)
        got = load_aware_split_triton(counts, log2phy, logcnt, dev, G, **kw)
        assert torch.equal(got, want), (E, extra, G, B, scale, spread, rounds)


def test_early_stop_equals_running_every_round(monkeypatch):
    """The reference stops at a fixed point; the kernel runs every pass: same slots. The case is
    picked so that the reference does stop early (counted by its pours) and so that more passes
    than one change the shares (rounds=1 differs), i.e. the rounds after the first matter."""
    import rq_tool.kernels.split as split
    from rq_tool.kernels.split_triton import load_aware_split_triton

    pours = []
    real_pour = split._pour
    monkeypatch.setattr(split, "_pour", lambda *a: pours.append(1) or real_pour(*a))
    rounds = split._ROUNDS
    gen = torch.Generator().manual_seed(11)
    for _ in range(50):  # the first random chain layout that needs more than one pass and converges
        log2phy, logcnt, dev = _random_map(12, 12, 4, gen)
        counts = torch.randint(0, 1000, (1, 12), generator=gen).to(DEV)
        pours.clear()
        want = load_aware_split(counts, log2phy, logcnt, dev, 4, rounds=rounds)
        passes = len(pours) // int((logcnt > 1).sum())
        if passes < 1 + rounds and not torch.equal(want, load_aware_split(counts, log2phy, logcnt, dev, 4, rounds=1)):
            break
    else:
        pytest.fail("no case stops early after more than one useful pass")
    assert 2 < passes < 1 + rounds
    assert torch.equal(load_aware_split_triton(counts, log2phy, logcnt, dev, 4, rounds=rounds), want)
    # and the kernel at exactly the passes the reference ran gives the same: the extra passes are no-ops
    assert torch.equal(load_aware_split_triton(counts, log2phy, logcnt, dev, 4, rounds=passes - 2), want)


@pytest.mark.parametrize("E,extra,G,B", SHAPES)
def test_round_robin_split_matches_reference(E, extra, G, B):
    from rq_tool.kernels.split_triton import round_robin_split_triton

    gen = torch.Generator().manual_seed(E + extra + G + B)
    log2phy, logcnt, dev = _random_map(E, extra, G, gen)
    counts = torch.randint(0, 500, (B, E), generator=gen).to(DEV)
    P = dev.numel()
    assert torch.equal(round_robin_split_triton(counts, log2phy, logcnt, P), round_robin_split(counts, log2phy, logcnt, P))


@pytest.mark.parametrize("T,K", [(1, 1), (33, 2), (257, 6), (2048, 2)])
@pytest.mark.parametrize("E,extra,G", [(8, 4, 2), (64, 32, 8), (16, 0, 4)])
def test_assign_slots_matches_reference(T, K, E, extra, G):
    from rq_tool.kernels.split_triton import assign_slots_triton

    gen = torch.Generator().manual_seed(T + K + E + extra + G)
    log2phy, logcnt, dev = _random_map(E, extra, G, gen)
    K = min(K, E)
    topk = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEV)
    counts = torch.bincount(topk.reshape(-1).cpu(), minlength=E).view(1, E).to(DEV)
    slot_counts = load_aware_split(counts, log2phy, logcnt, dev, G)[0]  # the split's parity is tested above
    got = assign_slots_triton(topk, log2phy, logcnt, slot_counts)
    assert torch.equal(got, assign_slots(topk, log2phy, logcnt, slot_counts))
    # every slot receives exactly its quota
    assert torch.equal(torch.bincount(got.reshape(-1), minlength=dev.numel()), slot_counts)


def test_choose_slots_triton_path_equals_torch(monkeypatch):
    """The replica-choice entry point gives the same slots on both implementations, also for one rank's slice."""
    from rq_tool.kernels.replica_choice import choose_slots

    gen = torch.Generator().manual_seed(5)
    log2phy, logcnt, dev = _random_map(16, 16, 4, gen)
    topk = torch.randint(0, 16, (40, 2), generator=gen).to(DEV)
    before = torch.randint(0, 5, (16,), generator=gen).to(DEV)
    step = before + torch.bincount(topk.reshape(-1).cpu(), minlength=16).to(DEV) + 3
    for args in ((), (before, step)):
        a = choose_slots(topk, log2phy, logcnt, "load-aware", dev, 4, *args, impl="torch")
        b = choose_slots(topk, log2phy, logcnt, "load-aware", dev, 4, *args, impl="triton")
        assert torch.equal(a, b)
