"""fit_devices: a plan within its total budget is repaired until it packs onto G device shares."""

import torch

from rq_tool.errors import RQError
from rq_tool.plan import PlanOptions, make_plan, place_slots
from rq_tool.plan.fit import fit_devices
from rq_tool.plan.predict import check_layer

NAMES = ["bf16", "int8", "nf4"]
NBYTES = torch.tensor([96, 51, 28])  # bf16, int8, nf4 bytes of one expert (int8 displaces ~2 nf4)


def _packs(plan, load, G):
    for i, lp in enumerate(plan.layers):
        slot_load = load[i][lp.phy2log] / lp.logcnt[lp.phy2log]
        try:
            place_slots(slot_load, NBYTES[lp.slot_scheme], G, lp.bytes_before // G)
        except RQError:
            return False
    return True


def test_fit_repairs_unpackable_layers_and_never_grows_bytes():
    g = torch.Generator().manual_seed(0)
    load = torch.rand(3, 16, generator=g).double() ** 4 * 1000
    error = torch.zeros(3, 16, 3, dtype=torch.float64)
    error[:, :, 1] = torch.rand(3, 16, generator=g).double() * 0.01
    error[:, :, 2] = error[:, :, 1] * 20
    budget = torch.full((3,), 16 * 96)
    plan = make_plan(load, error, NAMES, NBYTES, budget, PlanOptions())
    fitted = fit_devices(plan, load, error, 8)
    assert _packs(fitted, load, 8)
    for lp0, lp in zip(plan.layers, fitted.layers):
        assert lp.bytes_after <= lp0.bytes_after <= lp.bytes_before
        assert lp.phy2log[:16].tolist() == list(range(16))
        check_layer(lp.phy2log, lp.slot_scheme, lp.logcnt, lp.log2phy, 3)


def test_fit_keeps_packable_plans_unchanged():
    load = torch.tensor([[5.0, 5, 5, 5]])  # balanced: no replicas, 4 bf16 slots, 2 per device share
    error = torch.zeros(1, 4, 3, dtype=torch.float64)
    plan = make_plan(load, error, NAMES, NBYTES, torch.tensor([4 * 96]), PlanOptions())
    assert fit_devices(plan, load, error, 2).layers[0] is plan.layers[0]


def test_fit_converts_a_plan_that_outgrows_the_device_share():
    load = torch.tensor([[10.0, 1, 1, 1]])
    error = torch.ones(1, 4, 3, dtype=torch.float64)
    error[..., 0] = 0
    plan = make_plan(load, error, NAMES, NBYTES, torch.tensor([4 * 96 * 3]), PlanOptions(strategy="replicate-only"))
    fitted = fit_devices(plan, load, error, 2)
    assert _packs(fitted, load, 2) and not _packs(plan, load, 2)
    assert fitted.layers[0].bytes_after <= 4 * 96
