"""Device placement: packing, replication, the EPLB reference, and rq's placement against it."""

from __future__ import annotations

import pytest
import torch

from rq_tool.errors import RQError
from rq_tool.plan import PlanOptions, device_loads, make_plan, max_mean, place_slots
from rq_tool.plan.eplb import balanced_packing, rebalance_experts, replicate_experts

# DeepSeek EPLB's README example and the phy2log it prints (github deepseek-ai/EPLB)
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def _slot_load(weight_row, phy2log, logcnt):
    return weight_row.double()[phy2log] / logcnt[phy2log].double()


def test_balanced_packing_exact():
    pack, rank = balanced_packing(torch.tensor([[4, 4, 2, 2, 1, 1, 1, 1]]), 2)
    assert pack.tolist() == [[0, 1, 0, 1, 0, 1, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]
    assert max_mean(device_loads(torch.tensor([4.0, 4, 2, 2, 1, 1, 1, 1]), pack[0], 2)) == 1.0


def test_balanced_packing_equal_counts():
    weight = torch.rand(5, 12, generator=torch.Generator().manual_seed(0))
    for packs in (1, 2, 3, 4, 6, 12):
        pack, rank = balanced_packing(weight, packs)
        for n in range(5):
            assert torch.bincount(pack[n], minlength=packs).eq(12 // packs).all()
            for p in range(packs):  # ranks inside a pack are 0..size-1
                assert sorted(rank[n][pack[n] == p].tolist()) == list(range(12 // packs))


def test_replicate_experts_exact():
    phy2log, rank, logcnt = replicate_experts(torch.tensor([[10, 1], [1, 3]]), 4)
    assert phy2log.tolist() == [[0, 1, 0, 0], [0, 1, 1, 1]]
    assert rank.tolist() == [[0, 0, 1, 2], [0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1], [1, 3]]


def _check_maps(phy2log, log2phy, logcnt):
    L, E = logcnt.shape
    assert logcnt.min() >= 1 and logcnt.sum(-1).eq(phy2log.shape[1]).all()
    for l in range(L):
        for e in range(E):
            slots = log2phy[l, e, : logcnt[l, e]]
            assert torch.equal(slots, torch.nonzero(phy2log[l] == e).view(-1))
            assert log2phy[l, e, logcnt[l, e]:].eq(-1).all()


def test_eplb_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG  # same output as the published implementation
    _check_maps(phy2log, log2phy, logcnt)
    gpu = torch.arange(16) // 2  # 2 slots per GPU
    for l in range(2):
        assert torch.bincount(gpu, minlength=8).eq(2).all()
        loads = device_loads(_slot_load(README_WEIGHT[l], phy2log[l], logcnt[l]), gpu, 8)
        print(f"EPLB README example, layer {l}: per-GPU max/mean {max_mean(loads):.3f}")
        assert 1.0 <= max_mean(loads) < 1.3


def test_eplb_global_path():
    # 3 groups do not divide over 2 nodes: EPLB falls back to global replication and packing
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    _check_maps(phy2log, log2phy, logcnt)
    assert logcnt.tolist() == replicate_experts(README_WEIGHT, 16)[2].tolist()


def test_place_slots_known_optimum():
    load = torch.tensor([4.0, 4, 2, 2, 1, 1, 1, 1])
    dev = place_slots(load, torch.ones(8), 2)
    assert torch.bincount(dev, minlength=2).tolist() == [4, 4]
    assert max_mean(device_loads(load, dev, 2)) == 1.0


def test_place_slots_capacity():
    load = torch.tensor([5.0, 4, 3, 3, 2, 1])
    nbytes = torch.tensor([100, 100, 52, 52, 28, 28])
    dev = place_slots(load, nbytes, 3, capacity_bytes=130)
    used = torch.zeros(3, dtype=torch.int64).index_add_(0, dev, nbytes)
    assert used.max() <= 130
    # balancing first fails here (it puts 6 B next to a 5 B slot); the memory-first pass fits it
    dev = place_slots(torch.tensor([4.0, 3, 2, 1]), torch.tensor([5, 5, 6, 4]), 2, capacity_bytes=10)
    used = torch.zeros(2, dtype=torch.int64).index_add_(0, dev, torch.tensor([5, 5, 6, 4]))
    assert used.tolist() == [10, 10]
    with pytest.raises(RQError, match="cannot place 4 slots"):
        place_slots(torch.ones(4), torch.tensor([6, 6, 6, 6]), 2, capacity_bytes=10)


def test_place_slots_uneven_counts():
    dev = place_slots(torch.tensor([9.0, 1, 1, 1, 1]), torch.ones(5), 2)  # at most ceil(5/2) = 3 per device
    assert sorted(torch.bincount(dev, minlength=2).tolist()) == [2, 3]


def test_max_mean_edge_cases():
    assert max_mean(torch.zeros(4)) == 1.0
    assert max_mean(torch.tensor([3.0, 1.0])) == 1.5


def test_rq_placement_no_worse_than_eplb():
    """Same input, same slot count (16 on 8 GPUs): rq's replicas + place_slots vs EPLB."""
    opt = PlanOptions(strategy="replicate-only", min_gain=0.0, max_slots_factor=16 / 12, max_replicas_per_expert=16)
    weight = README_WEIGHT.double()
    plan = make_plan(weight, torch.zeros(2, 12, 1), ["bf16"], torch.tensor([1]), 1, opt)
    phy2log, _, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    for l, lp in enumerate(plan.layers):
        assert lp.num_physical == 16
        rq_load = _slot_load(weight[l], lp.phy2log, lp.logcnt)
        rq = max_mean(device_loads(rq_load, place_slots(rq_load, torch.ones(16), 8), 8))
        eplb = max_mean(device_loads(_slot_load(weight[l], phy2log[l], logcnt[l]), torch.arange(16) // 2, 8))
        print(f"layer {l}: per-GPU max/mean rq {rq:.3f}, EPLB {eplb:.3f}")
        assert rq <= eplb
