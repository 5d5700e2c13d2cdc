"""The planner: hand-made cases with exact outputs, then invariants over random load profiles."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rq_tool.errors import RQError
from rq_tool.lis import lis
from rq_tool.plan import STRATEGIES, Plan, PlanOptions, log2phy_from_phy2log, make_plan, resolve_budget
from rq_tool.plan.predict import check_layer, lis_of_counts
from rq_tool.plan.strategies import _pay, _Slots

BF16_INT8 = (["bf16", "int8"], torch.tensor([100, 52]))
THREE = (["bf16", "int8", "nf4"], torch.tensor([100, 52, 28]))
HOT = torch.tensor([[10.0, 1.0, 1.0, 1.0]])  # E=4, total 13, LIS 40/13


def _error(int8, nf4=None):
    """[1, E, S] error from per-expert int8 (and nf4) damage; the source scheme costs 0."""
    cols = [torch.zeros(len(int8)), torch.tensor(int8, dtype=torch.float64)]
    if nf4 is not None:
        cols.append(torch.tensor(nf4, dtype=torch.float64))
    return torch.stack(cols, -1)[None]


def _plan(load, error, schemes, budget, **opts):
    names, nbytes = schemes
    global_budget = opts.pop("global_budget", False)
    return make_plan(load, error, names, nbytes, budget, PlanOptions(**opts), global_budget=global_budget)


# ------------------------------------------------------------------ predictions


def test_lis_formulas():
    load = torch.tensor([10.0, 1.0, 1.0, 1.0])
    assert lis_of_counts(load, torch.ones(4, dtype=torch.int64)) == pytest.approx(4 * 10 / 13)
    assert lis_of_counts(load, torch.tensor([2, 1, 1, 1])) == pytest.approx(5 * 5 / 13)
    assert lis_of_counts(torch.zeros(4), torch.ones(4, dtype=torch.int64)) == 1.0
    assert float(lis(load)) == pytest.approx(40 / 13)


def test_log2phy_from_phy2log():
    log2phy, logcnt = log2phy_from_phy2log(torch.tensor([0, 1, 2, 0, 2, 0]), 3)
    assert torch.equal(logcnt, torch.tensor([3, 1, 2]))
    assert torch.equal(log2phy, torch.tensor([[0, 3, 5], [1, -1, -1], [2, 4, -1]]))


# ------------------------------------------------------------------ greedy, exact cases


def test_hot_expert_gets_free_replicas_with_room():
    plan = _plan(HOT, _error([8, 1, 2, 3]), BF16_INT8, torch.tensor([800]), max_replicas_per_expert=4)  # 2.0x: free
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 0, 0, 0]  # capped at max_replicas_per_expert=4
    assert lp.slot_scheme.tolist() == [0] * 7
    assert lp.logcnt.tolist() == [4, 1, 1, 1]
    assert lp.log2phy.tolist() == [[0, 4, 5, 6], [1, -1, -1, -1], [2, -1, -1, -1], [3, -1, -1, -1]]
    assert lp.lis_before == pytest.approx(40 / 13)
    assert lp.lis_after == pytest.approx(7 * 2.5 / 13)
    assert (lp.bytes_before, lp.bytes_after, lp.pred_error) == (400, 700, 0.0)


def test_replica_paid_by_cheapest_slots_at_1x():
    # bf16 replica (+100 B) paid by e1, e2 (48 B each) then e3 (error 3 < e0's share 8/2): error 6;
    # an int8 replica (+52 B, error 8/2) paid by e1, e2 would cost 7.
    plan = _plan(HOT, _error([8, 1, 2, 3]), BF16_INT8, torch.tensor([400]), max_replicas_per_expert=2)
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 0]
    assert lp.slot_scheme.tolist() == [0, 1, 1, 1, 0]
    assert lp.bytes_after == 356 and lp.pred_error == pytest.approx(6.0)
    assert lp.lis_after == pytest.approx(5 * 5 / 13)


def test_pay_requantizes_int8_to_nf4():
    # 0.5x of two experts: e0 -> int8 (ratio 1/48), e0 int8 -> nf4 (1/24), then e1 -> int8 finishes.
    slots = _Slots(_error([1, 10], [2, 100]), THREE[1])
    moves = _pay(slots, 100)
    for i, s in moves:
        slots.scheme[i] = s
    assert slots.scheme.tolist() == [2, 1]
    assert slots.total_error() == pytest.approx(12.0)


def test_budget_below_1x_quantizes_least_damaging_first():
    load = torch.ones(1, 4, dtype=torch.float64)  # balanced: no replicas
    plan = _plan(load, _error([4, 1, 3, 2], [40, 10, 30, 20]), THREE, resolve_budget(0.9, torch.tensor([400])))
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3] and lp.slot_scheme.tolist() == [0, 1, 0, 0]
    assert lp.bytes_after == 352 and lp.pred_error == pytest.approx(1.0)


def test_min_gain_bundles_tied_experts():
    # two tied hot experts: one replica alone raises LIS, both together lower it
    load = torch.tensor([[10.0, 10.0, 1.0, 1.0]])
    plan = _plan(load, _error([1, 1, 1, 1]), BF16_INT8, torch.tensor([1000]), max_replicas_per_expert=2)
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 0, 1]
    assert lp.lis_after == pytest.approx(6 * 5 / 22)


def test_caps_and_max_error():
    cheap = _error([8, 1, 2, 3])
    assert _plan(HOT, cheap, BF16_INT8, torch.tensor([800]), max_slots_factor=1.25).layers[0].num_physical == 5
    # at 1.0x every replica must be paid for with quantization error: max_error=0 forbids it
    assert _plan(HOT, cheap, BF16_INT8, torch.tensor([400]), max_error=0.0).layers[0].num_physical == 4
    assert _plan(HOT, cheap, BF16_INT8, torch.tensor([800]), max_error=0.0,
                 max_replicas_per_expert=4).layers[0].num_physical == 7
    # huge min_gain: nothing is worth it
    assert _plan(HOT, cheap, BF16_INT8, torch.tensor([800]), min_gain=0.9).layers[0].num_physical == 4


def test_dead_layer_and_dead_experts():
    load = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 3.0]])
    error = torch.zeros(2, 4, 2)
    error[1, :, 1] = torch.tensor([0.0, 5.0, 0.0, 5.0])  # dead experts: no tokens, no damage
    plan = _plan(load, error, BF16_INT8, torch.tensor([400, 400]))
    assert plan.layers[0].num_physical == 4 and plan.layers[0].lis_before == 1.0 == plan.layers[0].lis_after
    lp = plan.layers[1]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 1, 1] and lp.lis_after == pytest.approx(6 * 3 / 12)
    assert lp.slot_scheme[[0, 2]].tolist() == [1, 1]  # the dead experts pay first, for free


def test_global_budget_pays_with_the_other_layer():
    load = torch.tensor([[10.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    error = torch.cat([_error([8, 5, 5, 5]), _error([1, 1, 1, 1])])
    # per layer: an int8 replica (8/2) paid by e0 (8/2) and e1 (5) costs 13; globally 3 slots of layer 1 pay
    per_layer = _plan(load, error, BF16_INT8, torch.tensor([400, 400]), max_replicas_per_expert=2)
    glob = _plan(load, error, BF16_INT8, 800, max_replicas_per_expert=2, global_budget=True)
    assert glob.layers[0].phy2log.tolist() == per_layer.layers[0].phy2log.tolist() == [0, 1, 2, 3, 0]
    assert glob.layers[0].slot_scheme.tolist() == [0, 0, 0, 0, 0]
    assert glob.layers[1].slot_scheme.eq(1).sum() == 3  # 3 x 48 B >= 100 B
    assert glob.pred_error == pytest.approx(3.0) and per_layer.pred_error == pytest.approx(13.0)
    assert glob.bytes_after <= 800 and glob.budget_bytes == 800 and glob.layers[0].budget_bytes is None


# ------------------------------------------------------------------ other strategies


def test_paper_strategy_known_case():
    plan = _plan(HOT, _error([8, 1, 2, 3]), BF16_INT8, torch.tensor([400]), strategy="paper")
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 0]
    assert lp.slot_scheme.tolist() == [0, 1, 1, 0, 1]  # int8 replica, then e1, e2 (least damage)
    assert lp.bytes_after == 356 and lp.pred_error == pytest.approx(8 / 2 + 1 + 2)


def test_paper_strategy_errors():
    with pytest.raises(RQError, match="int8"):
        _plan(HOT, torch.zeros(1, 4, 2), (["bf16", "nf4"], torch.tensor([100, 28])), torch.tensor([400]),
              strategy="paper")
    with pytest.raises(RQError, match="layer 0: the paper strategy needs 260 bytes"):
        _plan(HOT, _error([8, 1, 2, 3]), BF16_INT8, torch.tensor([208]), strategy="paper")


def test_replicate_only_ignores_budget():
    plan = _plan(HOT, _error([8, 1, 2, 3]), BF16_INT8, torch.tensor([1]), strategy="replicate-only",
                 max_replicas_per_expert=4)
    lp = plan.layers[0]
    assert lp.phy2log.tolist() == [0, 1, 2, 3, 0, 0, 0] and lp.slot_scheme.eq(0).all()
    assert lp.bytes_after == 700 and lp.pred_error == 0.0


def test_registry_and_bad_inputs():
    assert {"greedy", "paper", "replicate-only"} <= set(STRATEGIES)
    assert all(fn.__doc__ and isinstance(fn.enforces_budget, bool) for fn in STRATEGIES.values())
    with pytest.raises(RQError, match="unknown strategy"):
        _plan(HOT, _error([1, 1, 1, 1]), BF16_INT8, 400, strategy="nope")
    with pytest.raises(RQError, match="disagree"):
        _plan(HOT, torch.zeros(1, 3, 2), BF16_INT8, 400)
    with pytest.raises(RQError, match="non-negative"):
        _plan(-HOT, _error([1, 1, 1, 1]), BF16_INT8, 400)


def test_infeasible_budget_names_the_layer():
    names, nbytes = BF16_INT8
    load = HOT.repeat(2, 1)
    error = torch.zeros(2, 4, 2)
    with pytest.raises(RQError, match=r"layer 7: budget 200 bytes is below the 208 bytes"):
        make_plan(load, error, names, nbytes, torch.tensor([400, 200]), layer_ids=[3, 7])
    with pytest.raises(RQError, match=r"all layers: budget 415 bytes is below the 416 bytes"):
        make_plan(load, error, names, nbytes, 415, global_budget=True)


# ------------------------------------------------------------------ formats


def test_plan_json_round_trip():
    plan = _plan(HOT.repeat(2, 1), _error([8, 1, 2, 3], [16, 2, 4, 6]).repeat(2, 1, 1), THREE, torch.tensor([400, 380]))
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["format"] == "rq-plan" and d["version"] == 2 and d["totals"]["bytes_after"] == plan.bytes_after
    again = Plan.from_dict(d)
    assert Plan.from_dict({**d, "version": 1}).to_dict() == plan.to_dict()  # v1 plans (no placement) still load
    assert again.to_dict() == plan.to_dict() and again.options == plan.options
    with pytest.raises(RQError, match="not an rq plan"):
        Plan.from_dict({"format": "other"})
    with pytest.raises(RQError, match="version 9"):
        Plan.from_dict({**d, "version": 9})
    d["layers"][1]["phy2log"][0] = 1  # slot 0 must hold expert 0, and log2phy / logcnt disagree
    with pytest.raises(RQError, match="malformed plan"):
        Plan.from_dict(d)


def test_plan_options():
    opt = PlanOptions(strategy="paper", max_error=1.5)
    assert PlanOptions.from_dict(json.loads(json.dumps(opt.to_dict()))) == opt
    assert opt.to_dict()["version"] == PlanOptions.VERSION
    with pytest.raises(RQError, match="unknown plan option"):
        PlanOptions.from_dict({"strategy": "greedy", "colour": "red"})
    for bad in ({"max_replicas_per_expert": 0}, {"max_slots_factor": 0.5}, {"min_gain": -1},
                {"max_error": -1.0}, {"error_weight": "vibes"}):
        with pytest.raises(RQError):
            PlanOptions(**bad)


@pytest.mark.parametrize("spec, expect", [
    (0.9, [900, 450]), ("0.9", [900, 450]), ("1.1x", [1100, 550]), (1.0, [1000, 500]),
    (0.29, [290, 145]), ("120MB", [120_000_000] * 2), ("1.5KiB", [1536] * 2), (4096, [4096] * 2),
    ("2 kb", [2000] * 2), ("10", [10000, 5000]),
])
def test_resolve_budget(spec, expect):
    assert resolve_budget(spec, torch.tensor([1000, 500])).tolist() == expect


def test_resolve_budget_global_and_bad_specs():
    assert resolve_budget(0.9, torch.tensor([1000, 500]), global_=True) == 1350
    assert resolve_budget("1MiB", torch.tensor([1000, 500]), global_=True) == 1 << 20
    for bad in ("abc", "", "12parsecs", "11", 10.5, "0", 0.0, -1, "-1MB", True, float("nan"), None, "0.1B"):
        with pytest.raises(RQError):
            resolve_budget(bad, torch.tensor([1000, 500]))


# ------------------------------------------------------------------ invariants over random profiles


@st.composite
def _problems(draw):
    L = draw(st.integers(1, 3))
    E = draw(st.integers(2, 10))
    S = draw(st.sampled_from([2, 3]))
    loads = draw(st.lists(st.integers(0, 1000), min_size=L * E, max_size=L * E))
    errs = draw(st.lists(st.floats(0, 100), min_size=L * E * (S - 1), max_size=L * E * (S - 1)))
    factor = draw(st.floats(0.6, 2.0))
    load = torch.tensor(loads, dtype=torch.float64).view(L, E) ** 2  # squaring makes skew common
    error = torch.cat([torch.zeros(L, E, 1), torch.tensor(errs, dtype=torch.float64).view(L, E, S - 1)], -1)
    schemes = THREE if S == 3 else BF16_INT8
    return load, error, schemes, factor


def _check(plan: Plan, load, S):
    for l, lp in enumerate(plan.layers):
        check_layer(lp.phy2log, lp.slot_scheme, lp.logcnt, lp.log2phy, S)  # >=1 slot each, maps agree
        for e in range(lp.num_logical):
            mine = lp.log2phy[e, : lp.logcnt[e]]
            assert torch.equal(mine, torch.nonzero(lp.phy2log == e).view(-1))
            assert lp.log2phy[e, lp.logcnt[e]:].eq(-1).all()
        assert lp.lis_before == pytest.approx(float(lis(load[l])))


@pytest.mark.parametrize("global_budget", [False, True])
@pytest.mark.parametrize("strategy", ["greedy", "paper"])
@settings(max_examples=30, deadline=None, derandomize=True)
@given(problem=_problems())
def test_invariants(problem, strategy, global_budget):
    load, error, schemes, factor = problem
    L, E, S = error.shape
    budget = resolve_budget(factor, torch.full((L,), E * int(schemes[1][0])), global_=global_budget)
    try:
        plan = _plan(load, error, schemes, budget, strategy=strategy, global_budget=global_budget)
    except RQError as exc:  # greedy always fits 0.6x; paper needs every slot in int8 plus the replica
        int8 = int(schemes[1][1])
        need = E * int8 * L + int8 * int((load.sum(-1) > 0).sum()) if global_budget else None
        assert strategy == "paper", str(exc)
        if global_budget:
            assert budget < need, str(exc)
        else:
            assert any(int(b) < E * int8 + int8 * bool(load[l].sum() > 0) for l, b in enumerate(budget)), str(exc)
        return
    _check(plan, load, S)
    if global_budget:
        assert plan.bytes_after <= budget
    else:
        assert all(lp.bytes_after <= int(b) for lp, b in zip(plan.layers, budget))
    if strategy == "greedy":
        assert all(lp.lis_after <= lp.lis_before + 1e-12 for lp in plan.layers)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_problems())
def test_infeasible_budget_raises_first(problem):
    load, error, schemes, _ = problem
    L, E, S = error.shape
    need = E * int(schemes[1].min())
    budget = torch.full((L,), need)
    budget[-1] = need - 1
    with pytest.raises(RQError, match=f"layer {L - 1}: budget {need - 1} bytes"):
        _plan(load, error, schemes, budget)
