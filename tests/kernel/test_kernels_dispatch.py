"""Replica-aware dispatch: torch reference vs a naive loop (full grid), Triton kernel vs reference.

Triton runs on CUDA when present, else in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported; ~20 ms per program, the wrapper then picks big blocks).
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_cases import ROUTING_GRID  # noqa: E402

from rq_tool.errors import RQError  # noqa: E402
from rq_tool.kernels import replica_dispatch, replica_dispatch_reference, resolve_impl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("phy_ids", "slot_counts", "sorted_ids", "block_slot")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_routing(T: int, E: int, K: int, max_replicas: int = 4, seed: int = 0):
    """topk_ids [T, K] (distinct per token), log2phy [E, R] (random permutation of P slots), logcnt [E]."""
    g = torch.Generator().manual_seed(seed)
    logcnt = torch.randint(1, max_replicas + 1, (E,), generator=g)
    P = int(logcnt.sum())
    perm = torch.randperm(P, generator=g)
    log2phy = torch.full((E, max_replicas), -1, dtype=torch.int64)
    starts = torch.cumsum(logcnt, 0) - logcnt
    for e in range(E):
        log2phy[e, : logcnt[e]] = perm[starts[e] : starts[e] + logcnt[e]]
    # skewed routing (heavy hitters), top-k distinct per token like a real router
    scores = torch.rand(T, E, generator=g) * torch.linspace(1.0, 3.0, E)[torch.randperm(E, generator=g)]
    topk_ids = scores.topk(K, dim=1).indices if T else torch.empty(0, K, dtype=torch.int64)
    return topk_ids, log2phy, logcnt, P


def naive_dispatch(topk_ids, log2phy, logcnt, P, block_size):
    """Per-pair Python loop straight from the policy's definition."""
    seen = [0] * log2phy.shape[0]
    l2p, cnt = log2phy.tolist(), logcnt.tolist()
    phy, per_slot = [], [[] for _ in range(P)]
    for i, e in enumerate(topk_ids.reshape(-1).tolist()):
        p = l2p[e][seen[e] % cnt[e]]
        seen[e] += 1
        phy.append(p)
        per_slot[p].append(i)
    sentinel, sorted_ids, block_slot = len(phy), [], []
    for p, ids in enumerate(per_slot):
        nblocks = -(-len(ids) // block_size)
        sorted_ids += ids + [sentinel] * (nblocks * block_size - len(ids))
        block_slot += [p] * nblocks
    as_t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return as_t(phy).reshape(topk_ids.shape), as_t([len(s) for s in per_slot]), as_t(sorted_ids), as_t(block_slot)


def assert_dispatch_equal(got, want):
    for f in FIELDS:
        assert torch.equal(getattr(got, f).cpu(), getattr(want, f).cpu()), f
    assert got.num_padded == want.num_padded == want.sorted_ids.numel()


def test_hand_made_example():
    # expert 0 has slots (0, 2), expert 1 slot 1; flat ids [0, 1, 0, 1, 0, 0]
    topk_ids = torch.tensor([[0, 1], [0, 1], [0, 0]])
    d = replica_dispatch_reference(topk_ids, torch.tensor([[0, 2], [1, -1]]), torch.tensor([2, 1]), 3, block_size=4)
    assert d.phy_ids.tolist() == [[0, 1], [2, 1], [0, 2]]
    assert d.slot_counts.tolist() == [2, 2, 2]
    assert d.sorted_ids.tolist() == [0, 4, 6, 6, 1, 3, 6, 6, 2, 5, 6, 6]
    assert d.block_slot.tolist() == [0, 1, 2] and d.num_padded == 12 and d.block_size == 4


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("T,E,K", ROUTING_GRID)
def test_reference_matches_naive(T, E, K, block_size):
    topk_ids, log2phy, logcnt, P = random_routing(T, E, K, seed=T * 1000 + E + K)
    d = replica_dispatch_reference(topk_ids, log2phy, logcnt, P, block_size)
    phy, counts, sorted_ids, block_slot = naive_dispatch(topk_ids, log2phy, logcnt, P, block_size)
    assert torch.equal(d.phy_ids, phy) and torch.equal(d.slot_counts, counts)
    assert torch.equal(d.sorted_ids, sorted_ids) and torch.equal(d.block_slot, block_slot)
    assert d.num_padded == sorted_ids.numel() and d.num_padded % block_size == 0


@pytest.mark.parametrize("T,E,K", [(33, 8, 8), (4096, 16, 2), (4096, 128, 8)])
def test_split_is_exact(T, E, K):
    """Replica loads of an expert differ by at most one, earlier replicas first, token order kept."""
    topk_ids, log2phy, logcnt, P = random_routing(T, E, K, seed=7)
    d = replica_dispatch_reference(topk_ids, log2phy, logcnt, P, block_size=16)
    load = torch.bincount(topk_ids.reshape(-1), minlength=E)
    for e in range(E):
        c = int(logcnt[e])
        per_replica = d.slot_counts[log2phy[e, :c]]
        assert int(per_replica.sum()) == int(load[e])
        assert int(per_replica.max() - per_replica.min()) <= 1
        assert torch.all(per_replica[:-1] >= per_replica[1:])  # round robin starts at replica 0
        # the j-th occurrence of e (flat order) sits on replica j % c
        occurrences = (topk_ids.reshape(-1) == e).nonzero().flatten()
        expect = log2phy[e, torch.arange(occurrences.numel()) % c]
        assert torch.equal(d.phy_ids.reshape(-1)[occurrences], expect)
    padded = (d.slot_counts + 15) // 16 * 16
    pad_start = torch.cumsum(padded, 0) - padded
    for p in range(P):  # inside a slot, pairs keep flat (token) order; then only padding
        seg = d.sorted_ids[int(pad_start[p]) : int(pad_start[p] + padded[p])]
        pairs, pad = seg[: int(d.slot_counts[p])], seg[int(d.slot_counts[p]) :]
        assert torch.all(pairs[1:] > pairs[:-1]) and torch.all(d.phy_ids.reshape(-1)[pairs] == p)
        assert torch.all(pad == T * K)


# The dispatch kernels are cheap even interpreted (a handful of programs per call), so the kernel
# runs on the full T x E x K grid at block_size 64, plus small (many blocks) and large block sizes.
KERNEL_CASES = [(T, E, K, 64) for T, E, K in ROUTING_GRID] + [
    (1, 8, 1, 16),
    (33, 16, 2, 16),
    (33, 128, 8, 32),
    (4096, 8, 2, 256),
    (4096, 16, 8, 256),
]


@pytest.mark.parametrize("T,E,K,block_size", KERNEL_CASES)
def test_triton_matches_reference(T, E, K, block_size):
    pytest.importorskip("triton")
    topk_ids, log2phy, logcnt, P = random_routing(T, E, K, seed=T + E * K)
    want = replica_dispatch_reference(topk_ids, log2phy, logcnt, P, block_size)
    got = replica_dispatch(topk_ids.to(DEVICE), log2phy.to(DEVICE), logcnt.to(DEVICE), P, block_size, impl="triton")
    assert_dispatch_equal(got, want)


@pytest.mark.parametrize("T,E,K", [(33, 128, 8), (4096, 64, 2)])
def test_triton_small_tiles_match_reference(T, E, K):
    """GPU-sized tiles (many chunks, several expert tiles, several block tiles) under the interpreter."""
    pytest.importorskip("triton")
    from rq_tool.kernels.dispatch_triton import replica_dispatch_triton

    topk_ids, log2phy, logcnt, P = random_routing(T, E, K, seed=3)
    want = replica_dispatch_reference(topk_ids, log2phy, logcnt, P, 16)
    dev = [t.to(DEVICE) for t in (topk_ids, log2phy, logcnt)]
    assert_dispatch_equal(replica_dispatch_triton(*dev, P, 16, tiles=(256, 32, 64)), want)


def test_impl_switch(monkeypatch):
    monkeypatch.setenv("RQ_KERNEL", "torch")
    assert resolve_impl(None, is_cuda=True) == "torch"
    monkeypatch.setenv("RQ_KERNEL", "triton")
    assert resolve_impl("torch", is_cuda=True) == "torch"  # the argument wins over the env var
    monkeypatch.setenv("RQ_KERNEL", "auto")
    assert resolve_impl(None, is_cuda=False) == "torch"
    monkeypatch.setenv("RQ_KERNEL", "cuda")
    with pytest.raises(RQError, match="RQ_KERNEL"):
        resolve_impl(None, is_cuda=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RQError, match="TRITON_INTERPRET"):
        resolve_impl("triton", is_cuda=False)


def test_import_and_reference_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, rq_tool.kernels as k\n"
        "d = k.replica_dispatch(torch.tensor([[0, 1]]), torch.tensor([[0], [1]]), torch.tensor([1, 1]), 2)\n"
        "assert d.phy_ids.tolist() == [[0, 1]] and not k.triton_available()\n"
        "try:\n    k.resolve_impl('triton', is_cuda=True)\nexcept k.backend.RQError as e:\n    print('ok', e)\n"
    )
    env = {**os.environ, "RQ_KERNEL": "auto"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok") and "not installed" in res.stdout


def test_worked_example_of_the_docstring():
    """The layout example in ``Dispatch``'s docstring, exactly, on every implementation."""
    topk_ids = torch.tensor([[0, 1], [0, 2], [1, 0]])
    log2phy, logcnt = torch.tensor([[0, 3], [1, -1], [2, -1]]), torch.tensor([2, 1, 1])
    want = (torch.tensor([[0, 1], [3, 2], [1, 0]]), torch.tensor([2, 2, 1, 1]),
            torch.tensor([0, 5, 1, 4, 3, 6, 2, 6]), torch.tensor([0, 1, 2, 3]))
    assert all(torch.equal(a, b) for a, b in zip(naive_dispatch(topk_ids, log2phy, logcnt, 4, 2), want))
    impls = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
    for impl in impls:
        d = replica_dispatch(topk_ids.to(DEVICE), log2phy.to(DEVICE), logcnt.to(DEVICE), 4, 2, impl=impl)
        assert d.num_padded == 8 and d.num_pairs == 6
        for name, w in zip(FIELDS, want):
            assert torch.equal(getattr(d, name).cpu(), w), (impl, name)
