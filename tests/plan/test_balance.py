"""Per-step balance planning (rq_tool.plan.steps / layout / balance), profile v2 and ``rq plan``."""

import json

import pytest
import torch
from click.testing import CliRunner

from rq_tool.cli import main
from rq_tool.kernels.split import split_counts
from rq_tool.plan.balance import Layout, plan_balance
from rq_tool.plan.layout import fill_layout, replicate
from rq_tool.plan.predict import log2phy_from_phy2log
from rq_tool.plan.steps import contiguous_layout, max_over_mean, sample_steps, step_device_loads


def _random_layers(L, E, G, seed):
    g = torch.Generator().manual_seed(seed)
    phy, dev = [], []
    for l in range(L):
        P = E + 3 * l
        phy.append(torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=g)]))
        dev.append(torch.randperm(P, generator=g) % G)
    Pm = max(p.numel() for p in phy)
    p2l, sd = torch.full((L, Pm), -1), torch.full((L, Pm), -1)
    for l in range(L):
        p2l[l, : phy[l].numel()], sd[l, : phy[l].numel()] = phy[l], dev[l]
    return phy, dev, p2l, sd


@pytest.mark.parametrize("policy", ["round-robin", "load-aware"])
def test_batched_step_loads_equal_the_split_contract(policy):
    L, E, G, B = 4, 12, 4, 5
    phy, dev, p2l, sd = _random_layers(L, E, G, seed=3)
    counts = torch.randint(0, 90, (B, L, E), generator=torch.Generator().manual_seed(4))
    got = step_device_loads(counts, p2l, sd, G, policy)
    for l in range(L):
        l2p, cnt = log2phy_from_phy2log(phy[l], E)
        sc = split_counts(policy, counts[:, l], l2p, cnt, dev[l], G)
        ref = torch.zeros(B, G, dtype=torch.int64).scatter_add_(1, dev[l].expand(B, -1), sc)
        assert torch.equal(ref, got[:, l])


def test_fill_layout_reaches_the_level_on_zipf_and_keeps_its_invariants():
    E, G, P = 64, 8, 80
    w = (1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 2)[torch.randperm(E, generator=torch.Generator().manual_seed(0))]
    phy, dev, level, ok = fill_layout(w[None] * 1e6, torch.tensor([P]), G, fill_all=True)
    assert bool(ok) and torch.equal(phy[0, :E], torch.arange(E))
    assert int((phy >= 0).sum()) == P and torch.equal(torch.bincount(dev[0], minlength=G), torch.full((G,), P // G))
    pairs = phy[0] * G + dev[0]
    assert pairs.unique().numel() == P, "copies of one expert share a device"
    lb = float((w / replicate(w[None], torch.tensor([P]))[0]).max() * G / w.sum())
    got = float(max_over_mean(step_device_loads((w * 1e6).round().long()[None, None], phy, dev, G, "load-aware")))
    assert lb <= 1.0 + 1e-9 and got <= 1.02  # EPLB's packing ends near 1.04 here


def test_pinned_copies_never_raise_load_aware_max_over_standard_ep():
    L, E, G = 3, 16, 4
    g = torch.Generator().manual_seed(1)
    w = torch.rand(L, E, generator=g) ** 4
    orig = Layout(*contiguous_layout(L, E, G))
    phy, dev, _, ok = fill_layout(w, torch.full((L,), 24), G, pin=True, pin_dev=orig.slot_device)
    assert ok.all() and torch.equal(dev[:, :E], orig.slot_device)
    traffic = torch.randint(0, 50, (40, L, E), generator=g) * (torch.rand(40, L, E, generator=g) < 0.3)
    after = step_device_loads(traffic, phy, dev, G, "load-aware").amax(-1)
    before = step_device_loads(traffic, orig.phy2log, orig.slot_device, G, "load-aware").amax(-1)
    assert (after <= before).all()


def test_plan_balance_keeps_the_original_where_held_out_folds_say_so():
    L, E, G, N = 2, 8, 4, 24
    g = torch.Generator().manual_seed(2)
    dom = torch.arange(N) % 3
    hot = torch.zeros(3, L, E)
    hot[0, :, 0], hot[1, :, 3], hot[2, :, 6] = 60.0, 60.0, 60.0
    seq = torch.poisson(hot[dom] + 5.0, generator=g).long()
    orig = Layout(*contiguous_layout(L, E, G))
    res = plan_balance(seq, G, 12, orig, policy="load-aware", per_step=4, groups=dom, group_names=["a", "b", "c"])
    assert res.folds == ["a", "b", "c"]
    for l, c in enumerate(res.choice):
        assert max(res.ratio[c][f][l] for f in range(3)) <= 1.0 + 1e-9
    steps = sample_steps(seq, 4, 16)
    after = step_device_loads(steps, res.layout.phy2log, res.layout.slot_device, G, "load-aware").amax(-1)
    before = step_device_loads(steps, orig.phy2log, orig.slot_device, G, "load-aware").amax(-1)
    assert float(after.double().mean()) <= float(before.double().mean())


def test_with_held_out_folds_every_original_stays_on_its_device():
    """Load-aware plans with folds are pinned (or the original): traffic unlike any calibration
    domain -- here the experts no fold made hot -- is never busier per step than standard EP."""
    L, E, G, N = 3, 16, 4, 48
    g = torch.Generator().manual_seed(5)
    dom = torch.arange(N) % 3
    hot = torch.rand(3, L, E, generator=g) ** 6 * 200
    seq = torch.poisson(hot[dom] + 2.0, generator=g).long()
    orig = Layout(*contiguous_layout(L, E, G))
    res = plan_balance(seq, G, 24, orig, policy="load-aware", per_step=4, groups=dom, group_names=["a", "b", "c"])
    assert set(res.choice) <= {"pinned", "original"} and "pinned" in res.choice
    slot_of = res.layout.phy2log[:, :E]
    assert torch.equal(slot_of, orig.phy2log) and torch.equal(res.layout.slot_device[:, :E], orig.slot_device)
    unseen = torch.poisson((hot.sum(0) < 1).double()[None].expand(64, L, E) * 40 + 1.0, generator=g).long()
    after = step_device_loads(unseen, res.layout.phy2log, res.layout.slot_device, G, "load-aware").amax(-1)
    before = step_device_loads(unseen, orig.phy2log, orig.slot_device, G, "load-aware").amax(-1)
    assert bool((after <= before).all())


def test_profile_v2_round_trip_v1_and_tampering(tmp_path):
    from rq_tool.calibrate.profile import LayerProfile, Profile
    from rq_tool.errors import RQError

    E, L, N = 4, 2, 6
    layers = [LayerProfile(l, torch.zeros(E, dtype=torch.int64), *(torch.zeros(E, dtype=torch.float64),) * 3, {}, {})
              for l in range(L)]
    seq = torch.randint(0, 9, (N, L, E))
    for l in range(L):
        layers[l].load = seq[:, l].sum(0)
    prof = Profile({"num_experts": E}, {"seq_len": 8}, [], layers, seq_loads=seq,
                   seq_domain=torch.tensor([0, 1, 0, 1, 0, 1]), domains=["a", "b"])
    prof.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert torch.equal(back.seq_loads, seq) and back.domains == ["a", "b"] and back.seq_domain.tolist() == [0, 1] * 3
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["version"] == 2 and d["loads"]["shape"] == [N, L, E]
    v1 = {k: v for k, v in d.items() if k != "loads"}
    v1["version"] = 1
    assert Profile.from_dict(v1).seq_loads is None
    blob = bytearray((tmp_path / "p.loads.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "p.loads.safetensors").write_bytes(bytes(blob))
    with pytest.raises(RQError, match="sha256"):
        Profile.load(tmp_path / "p.json")


def test_rq_plan_sglang_counts_json_pt_and_loads(tmp_path):
    from safetensors.torch import save_file

    from rq_tool.runtime.routing_map import RoutingMap

    E, G, H = 8, 4, 3
    g = torch.Generator().manual_seed(5)
    steps = torch.randint(0, 40, (12, H, E), generator=g)
    steps[:, 0] = 0  # a dense layer
    (tmp_path / "counts.json").write_text(json.dumps({"logical_count": steps.tolist()}))
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "counts.json"), "--ep-size", str(G), "--budget", "1.5",
                                  "--out", str(tmp_path / "loc.json")])
    assert r.exit_code == 0, r.output
    m = torch.tensor(json.loads((tmp_path / "loc.json").read_text())["physical_to_logical_map"])
    assert m.shape == (H, 12) and all(set(m[h].tolist()) == set(range(E)) for h in (1, 2))
    torch.save({"logical_count": steps.sum(0)}, tmp_path / "counts.pt")
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "counts.pt"), "--ep-size", str(G), "--engine", "rq",
                                  "--out", str(tmp_path / "map.json")])
    assert r.exit_code == 0, r.output
    rmap = RoutingMap.from_dict(json.loads((tmp_path / "map.json").read_text()))
    assert rmap.num_devices == G and [lm.layer for lm in rmap.layers] == [1, 2]
    save_file({"loads": steps[:, 1:].contiguous()}, str(tmp_path / "loads.safetensors"))
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "loads.safetensors"), "--ep-size", str(G), "--engine", "vllm"])
    assert r.exit_code == 0 and "--enable-eplb" in r.output


@pytest.mark.parametrize("content,match", [
    ('{"logical_count": [[1, 2], [3]]}', "logical_count"),
    ('{"counts": 1}', "no 'logical_count'"),
    ('[[-1, 2]]', "non-negative"),
    ("not json", "not valid JSON"),
])
def test_rq_plan_bad_inputs_one_line_exit_2(tmp_path, content, match):
    src = tmp_path / "bad.json"
    src.write_text(content)
    r = CliRunner().invoke(main, ["plan", str(src), "--ep-size", "2", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and match in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "o.json").exists()


def test_tight_fill_reaches_a_lower_level_with_two_slots_per_device():
    # E=64 on G=64 devices, 128 slots: two slots a device. The plain level fill stacks cold experts
    # and leaves the hot ones no slots (level ~1.05); the tight fill keeps one unsplit expert per
    # device and wraps the split ones through the slots left (level near 1.0).
    E, G, P = 64, 64, 128
    w = (1.0 / torch.arange(1, E + 1, dtype=torch.float64))[torch.randperm(E, generator=torch.Generator().manual_seed(0))]
    _, _, plain, ok0 = fill_layout(w[None] * 1e6, torch.tensor([P]), G, fill_all=True)
    phy, dev, level, ok = fill_layout(w[None] * 1e6, torch.tensor([P]), G, fill_all=True, tight=True)
    assert bool(ok0) and bool(ok) and torch.equal(phy[0, :E], torch.arange(E))
    assert torch.equal(torch.bincount(dev[0], minlength=G), torch.full((G,), P // G))
    assert (phy[0] * G + dev[0]).unique().numel() == P, "copies of one expert share a device"
    assert float(level) <= 1.01 < float(plain)


def test_star_fill_is_what_the_runtime_split_balances():
    # Same two-slots-a-device case. The tight fill's chain of split experts (each remainder closed by
    # the next split expert) fills to ~1.004 but the 12-round Gauss-Seidel split only reaches ~1.06
    # on it; the star fill keeps split experts off each other's devices and the split reaches its level.
    E, G, P = 64, 64, 128
    w = (1.0 / torch.arange(1, E + 1, dtype=torch.float64))[torch.randperm(E, generator=torch.Generator().manual_seed(0))]
    counts = (w * 1e6).round().long()[None, None]

    def split_score(phy, dev):
        return float(max_over_mean(step_device_loads(counts, phy, dev, G, "load-aware"))[0, 0])

    phy_w, dev_w, _, _ = fill_layout(w[None] * 1e6, torch.tensor([P]), G, fill_all=True, tight=True)
    phy, dev, level, ok = fill_layout(w[None] * 1e6, torch.tensor([P]), G, fill_all=True, tight=True, star=True)
    assert bool(ok) and torch.equal(phy[0, :E], torch.arange(E))
    assert torch.equal(torch.bincount(dev[0], minlength=G), torch.full((G,), P // G))
    assert (phy[0] * G + dev[0]).unique().numel() == P, "copies of one expert share a device"
    star = split_score(phy, dev)
    assert float(level) <= 1.01 and star <= float(level) + 1e-3
    assert star + 0.03 < split_score(phy_w, dev_w)


def test_round_robin_plan_skips_only_the_fill_twins():
    # under round-robin the fill-only candidates are the mean candidate's layout; planning without
    # them picks what planning with them picked (ties go to the earlier candidate, mean)
    import rq_tool.plan.balance as bal

    N, L, E, G = 16, 3, 16, 4
    seq = torch.randint(0, 9, (N, L, E), generator=torch.Generator().manual_seed(6)) * (1 + 5 * (torch.arange(E) < 3))
    orig = Layout(*contiguous_layout(L, E, G))
    got = plan_balance(seq, G, 20, orig, policy="round-robin", per_step=4, fill_all=True)
    assert not set(got.ratio) & set(bal.FILL_ONLY)
    saved = bal.FILL_ONLY
    try:
        bal.FILL_ONLY = ()
        full = plan_balance(seq, G, 20, orig, policy="round-robin", per_step=4, fill_all=True)
    finally:
        bal.FILL_ONLY = saved
    assert torch.equal(full.layout.phy2log, got.layout.phy2log) and torch.equal(full.layout.slot_device, got.layout.slot_device)
    for c in saved:
        assert full.ratio[c] == full.ratio["mean"]


def test_plan_table_reports_per_device_memory_of_the_placement():
    """The plan table's per-device memory is the placement's own bytes: recomputed here from slot_device."""
    from rq_tool.plan.ep_plan import plan_ep
    from rq_tool.rewrite.table import device_memory, plan_table

    N, L, E, G = 24, 2, 8, 4
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, 5, (N, L, E), generator=g) * (1 + 6 * (torch.arange(E) < 2))  # two hot experts
    nbytes = torch.tensor([100, 50])
    plan = plan_ep(seq.double(), torch.zeros(L, E, 2), ("bf16", "int8"), nbytes, torch.full((L,), E * 100), G,
                   max_error=None)
    mem = device_memory(plan)
    assert plan.num_devices == G and len(mem) == L
    for lp, m in zip(plan.layers, mem):
        want = [int(nbytes[lp.slot_scheme[lp.slot_device == d]].sum()) for d in range(G)]
        assert m["bytes"] == want and sum(want) == lp.bytes_after
        assert m["fullest"] == pytest.approx(max(want) / (lp.bytes_before / G)) and m["fullest"] <= 1.0 + 1e-9
    assert f"fullest device {max(m['fullest'] for m in mem):.3f}x" in plan_table(plan)
