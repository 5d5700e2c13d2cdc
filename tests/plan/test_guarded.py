"""The default rq rewrite plan: greedy with the accuracy guard and the held-out do-no-harm check."""

import torch

from rq_tool.cli_types import CapOrOff
from rq_tool.plan.guarded import plan_guarded
from rq_tool.plan.types import PlanOptions

NBYTES = torch.tensor([400, 200, 100])  # bf16, int8, nf4


def _error(L, E):
    g = torch.Generator().manual_seed(0)
    base = torch.rand(L, E, 1, generator=g) * 1e-5 + 1e-6
    return torch.cat([torch.zeros(L, E, 1), base, base * 8], dim=-1)


def _plan(seq, groups, max_error=1e-3):
    N, L, E = seq.shape
    return plan_guarded(seq, _error(L, E), ("bf16", "int8", "nf4"), NBYTES, torch.full((L,), E * 400),
                        PlanOptions(max_error=max_error), groups=groups,
                        group_names=[f"d{i}" for i in range(int(groups.max()) + 1)], per_step=2)


def test_stable_skew_replicates_and_keeps_hot_experts_precise():
    E, L, N = 16, 2, 32
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(5, 15, (N, L, E), generator=g)
    seq[:, :, 0] += 400  # the same hot expert in every domain: replication holds up
    groups = torch.arange(N) % 4
    plan = _plan(seq, groups)
    for lp in plan.layers:
        assert lp.num_replicas >= 1
        assert int(lp.slot_scheme[0]) == 0  # the hot expert stays in the source precision
        assert (lp.slot_scheme[lp.phy2log == 0] == 0).all()
        assert lp.pred_error <= 1e-3 + 1e-12
        assert lp.bytes_after <= E * 400
    assert max(plan.balance["heldout_ratio"]) <= 1.0 + 1e-9
    mixed = plan.balance["policies"]["round-robin"]["mixed"]
    assert mixed["after"]["mean"] < mixed["before"]["mean"]


def test_shifting_hot_expert_keeps_original_layout():
    E, L, N = 16, 1, 32
    seq = torch.full((N, L, E), 10)
    groups = torch.arange(N) % 4
    for d in range(4):  # each domain has its own hot expert: what calibration replicates does not hold up
        seq[groups == d, 0, 4 * d] += 400
    plan = _plan(seq, groups)
    assert max(plan.balance["heldout_ratio"]) <= 1.0 + 1e-9
    for name, v in plan.balance["policies"]["round-robin"].items():
        assert v["after"]["mean"] <= v["before"]["mean"] + 1e-9, name


def test_max_error_none_turns_the_cap_off():
    assert CapOrOff(0.0, 1.0).convert("none", None, None) is None
    assert CapOrOff(0.0, 1.0).convert("off", None, None) is None
    assert CapOrOff(0.0, 1.0).convert("0.01", None, None) == 0.01
