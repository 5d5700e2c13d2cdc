"""Simulated expert parallelism on hand-made loads with known optimal placements; Spearman/size study."""

import importlib.util
from pathlib import Path

import pytest
import torch

from rq_tool.eval.ep import (contiguous_devices, contiguous_max_mean, eplb_max_mean, placed_max_mean,
                             simulate_layer)

# the calibration-size study is a script's helper (scripts/calib_study.py), not part of the package
_spec = importlib.util.spec_from_file_location(
    "calib_study", Path(__file__).resolve().parents[2] / "scripts" / "calib_study.py")
_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_study)
size_study, spearman = _study.size_study, _study.spearman


def test_contiguous_is_the_standard_ep_layout():
    assert contiguous_devices(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # experts 0,1 on device 0 carry 10 of 16 tokens: max/mean = 10 / 4
    load = torch.tensor([6, 4, 1, 1, 1, 1, 1, 1])
    assert contiguous_max_mean(load, 4) == pytest.approx(2.5)
    assert contiguous_max_mean(torch.ones(8), 8) == 1.0
    assert contiguous_max_mean(torch.zeros(8), 2) == 1.0  # no tokens: balanced by definition


def test_placement_finds_the_perfect_split():
    # 8 equal-size slots, 2 devices with room for 4 each: {6,3,2,0} / {5,4,1,1} = 11 / 11 is optimal
    load = torch.tensor([6.0, 5, 4, 3, 2, 1, 1, 0])
    r = placed_max_mean(load, torch.full((8,), 10), 2, original_bytes=80)
    assert r["max_mean"] == pytest.approx(1.0)
    assert r["fits_original_share"] and r["device_bytes_ratio"] == pytest.approx(1.0)
    # contiguous would put 18 of 22 on device 0
    assert contiguous_max_mean(load, 2) == pytest.approx(18 / 11)


def test_one_hot_expert_needs_replicas():
    # one expert carries everything: without replicas the best is G x mean; quantized to half size,
    # the same memory holds 3 replicas of it, one slot of expert 0 per device: balanced
    load = torch.tensor([8.0, 0, 0, 0])
    assert placed_max_mean(load, torch.full((4,), 10), 4, original_bytes=40)["max_mean"] == pytest.approx(4.0)
    slot_load = torch.tensor([2.0, 0, 0, 0, 2, 2, 2])  # expert 0 split over slots 0, 4, 5, 6
    slot_bytes = torch.full((7,), 5)  # 35 bytes <= the original 40, two slots per device
    r = placed_max_mean(slot_load, slot_bytes, 4, original_bytes=40)
    assert r["max_mean"] == pytest.approx(1.0) and r["fits_original_share"]


def test_placement_plans_on_calibration_and_scores_on_measured():
    # planned on loads that say slots 0,1 are hot (so they land on different devices); measured
    # loads say slots 0 and 2 are hot -- the score must use the measured loads
    plan = torch.tensor([5.0, 5, 1, 1])
    measured = torch.tensor([5.0, 1, 5, 1])
    r = placed_max_mean(measured, torch.ones(4, dtype=torch.int64), 2, original_bytes=4, plan_slot_load=plan)
    oracle = placed_max_mean(measured, torch.ones(4, dtype=torch.int64), 2, original_bytes=4)
    assert oracle["max_mean"] == pytest.approx(1.0)
    assert r["max_mean"] >= oracle["max_mean"]


def test_slots_that_do_not_bin_pack_are_reported():
    # 5 full-size + 11 quarter-size slots fit the layer's bytes (5*48 + 11*13 <= 8*48) but not 8
    # equal shares: the 3 devices left hold 3 small slots each, 9 < 11
    slot_bytes = torch.tensor([48] * 5 + [13] * 11)
    r = placed_max_mean(torch.ones(16), slot_bytes, 8, original_bytes=8 * 48)
    assert not r["fits_original_share"] and r["device_bytes_ratio"] > 1.0
    # memory that grew (replicate-only) never fits the original share
    r = placed_max_mean(torch.ones(10), torch.full((10,), 10), 2, original_bytes=80)
    assert not r["fits_original_share"] and r["device_bytes_ratio"] == pytest.approx(50 / 40)


def test_eplb_reference_known_optimum():
    # two extra slots both go to expert 0 (6 -> 3 -> 2 per slot): six slots of load 2, 3 per GPU
    r = eplb_max_mean(torch.tensor([6.0, 2, 2, 2]), num_slots=6, num_devices=2)
    assert r == {"max_mean": pytest.approx(1.0), "slots": 6}
    # slot count is rounded up to a multiple of the device count
    assert eplb_max_mean(torch.tensor([6.0, 2, 2, 2]), num_slots=5, num_devices=2)["slots"] == 6


def test_simulate_layer_original_experts():
    load = torch.tensor([6.0, 5, 4, 3, 2, 1, 1, 0])
    out = simulate_layer(load, load, torch.arange(8), torch.full((8,), 10), 80, device_counts=(2, 4))
    assert set(out) == {2, 4}
    assert out[2]["contiguous"] == pytest.approx(18 / 11) and out[2]["placed"] == pytest.approx(1.0)
    assert out[4]["eplb_slots"] == 8 and out[4]["fits_original_share"]


def test_spearman_and_size_study():
    a = torch.tensor([1.0, 2, 3, 4])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1, 2, 3]), torch.tensor([1.0, 1, 2, 3])) == pytest.approx(1.0)
    assert spearman(torch.ones(4), a) == 0.0
    # 2 layers, 4 sequences, 3 experts; truth ranks expert 0 > 1 > 2 in layer 0
    seq = torch.tensor([[[5, 1, 0], [1, 4, 1], [4, 1, 1], [4, 2, 0]],
                        [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]])
    truth = torch.tensor([[14, 8, 2], [4, 4, 4]])
    rows = size_study(seq, truth, sizes=(1, 4, 16))
    assert [r["sequences"] for r in rows] == [1, 4]  # capped at the 4 sequences there are
    assert rows[-1]["spearman"][0] == pytest.approx(1.0)
    assert rows[-1]["lis_abs_error"] == pytest.approx([0.0, 0.0])
    assert rows[0]["lis_abs_error_mean"] > 0


def test_mixture_pool_rescales_domains():
    from rq_tool.eval.measure import Measure

    a = Measure(nll_sum=10.0, correct=5, tokens=10, load=torch.tensor([[10, 0]]), slot_load=[torch.tensor([10, 0])],
                batch_lis=torch.tensor([[2.0]]))
    b = Measure(nll_sum=40.0, correct=0, tokens=20, load=torch.tensor([[0, 20]]), slot_load=[torch.tensor([0, 20])],
                batch_lis=torch.tensor([[2.0, 2.0]]))
    plain = Measure.pool([a, b])
    assert plain.tokens == 30 and plain.lis_layers() == pytest.approx([2 * 20 / 30])
    mix = Measure.pool([a, b], [3.0, 1.0])  # 75% like a, 25% like b, 30 tokens in all
    assert mix.tokens == 30 and mix.nll_sum == pytest.approx(0.75 * 30 * 1.0 + 0.25 * 30 * 2.0)
    assert mix.correct == pytest.approx(0.75 * 30 * 0.5)
    assert mix.slot_load[0].tolist() == pytest.approx([22.5, 7.5])
    assert float(mix.batch_lis.mean()) == pytest.approx(2.0)
