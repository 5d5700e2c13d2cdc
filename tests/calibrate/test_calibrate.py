"""Calibration: exact load counts on every family, LIS unit cases, profile round trip."""

import json

import pytest
import torch

from rq_tool.arch import get_family
from rq_tool.calibrate import ExpertRecorder, Profile, calibrate, config_fingerprint
from rq_tool.errors import RQError
from rq_tool.lis import excess_removed, lis, lis_by_batch
from tiny_models import FAMILIES, save_tiny, tiny_model, write_texts


@pytest.mark.parametrize("model_type", FAMILIES)
def test_loads_equal_router_logits_through_family_rule(model_type):
    model = tiny_model(model_type)
    family = get_family(model.config)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with ExpertRecorder(model, family, ("int8", "nf4")) as rec:
            rec.batch_size = 3
            out = model(input_ids=ids, output_router_logits=True)
        restored = model(input_ids=ids).logits
    blocks = family.moe_blocks(model)
    assert len(rec.stats) == len(blocks) == len(out.router_logits)
    for (layer, block), st, logits in zip(blocks, rec.stats, out.router_logits):
        ids_rule, weights_rule = family.route(family.router(block), logits)
        E = st.num_experts
        assert torch.equal(st.load, torch.bincount(ids_rule.reshape(-1), minlength=E))
        mass = torch.zeros(E, dtype=torch.float64).scatter_add_(0, ids_rule.reshape(-1), weights_rule.reshape(-1).double())
        torch.testing.assert_close(st.gate_mass, mass, rtol=1e-5, atol=1e-6)
        assert torch.equal(torch.cat(st.seq_load).sum(0), st.load)  # per-sequence loads add up
        assert (st.output_energy[st.load > 0] > 0).all()
        # nf4 damages more than int8 wherever an expert saw tokens
        hit = st.load > 0
        assert (st.quant_error["nf4"][hit] > st.quant_error["int8"][hit]).all()
    # the instrumented forward is the model's own math, and the model is restored afterwards
    torch.testing.assert_close(out.logits, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(restored, plain)
    assert all("forward" not in b.experts.__dict__ for _, b in blocks)


def test_recorder_restores_on_error():
    model = tiny_model("qwen3_moe")
    family = get_family(model.config)
    with pytest.raises(RuntimeError):
        with ExpertRecorder(model, family, ()):
            raise RuntimeError("boom")
    assert all("forward" not in b.experts.__dict__ for _, b in family.moe_blocks(model))


def test_shared_experts_recorded_apart():
    model = tiny_model("qwen2_moe")
    family = get_family(model.config)
    with torch.inference_mode(), ExpertRecorder(model, family, ()) as rec:
        model(input_ids=torch.randint(0, 90, (2, 16)))
    for st in rec.stats:
        assert st.has_shared and st.shared_tokens == 32 and st.shared_energy > 0
        assert int(st.load.sum()) == 32 * 2  # routed token-slots only


def test_lis_unit_cases():
    assert float(lis(torch.tensor([5, 5, 5, 5]))) == 1.0
    assert float(lis(torch.tensor([8, 0, 0, 0]))) == 4.0
    assert float(lis(torch.tensor([3, 1]))) == pytest.approx(1.5)
    assert float(lis(torch.zeros(4))) == 1.0
    torch.testing.assert_close(lis(torch.tensor([[2, 2], [4, 0]])), torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert excess_removed(2.0, 1.4) == pytest.approx(0.6)
    assert excess_removed(1.0, 1.0) == 0.0
    seq = torch.tensor([[4, 0], [0, 4], [4, 0], [0, 4]])
    by = lis_by_batch(seq, (1, 2, 4, 8))
    assert by[1]["mean"] == 2.0 and by[2]["mean"] == 1.0 and by[4]["max"] == 1.0 and 8 not in by


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    save_tiny("mixtral", root / "model")
    write_texts(root / "texts.jsonl", 80)
    return root


def test_profile_round_trip_and_identity(tiny_dir, tmp_path):
    prof = calibrate(tiny_dir / "model", str(tiny_dir / "texts.jsonl"), num_samples=12, seq_len=32, batch_size=4,
                     progress=False)
    assert prof.calibration["sequences"] == 12 and prof.calibration["tokens"] == 12 * 32
    assert [lp.layer for lp in prof.layers] == [0, 1]
    for lp in prof.layers:
        assert int(lp.load.sum()) == 12 * 32 * 2
        assert set(lp.lis_by_batch) == {1, 4}
        assert lp.lis_by_batch[4]["mean"] <= lp.lis_by_batch[1]["mean"] + 1e-9 or lp.lis_by_batch[1]["max"] >= lp.lis
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(path)
    assert json.loads(path.read_text()) == back.to_dict()
    for a, b in zip(prof.layers, back.layers):
        assert torch.equal(a.load, b.load)
        torch.testing.assert_close(a.quant_error["int8"], b.quant_error["int8"], rtol=1e-7, atol=0)
    from transformers import AutoConfig

    back.check_matches(AutoConfig.from_pretrained(tiny_dir / "model"))
    with pytest.raises(RQError, match="another model"):
        back.check_matches(AutoConfig.for_model("mixtral", hidden_size=32))
    # same inputs and seed: identical profile
    again = calibrate(tiny_dir / "model", str(tiny_dir / "texts.jsonl"), num_samples=12, seq_len=32, batch_size=4,
                      progress=False)
    assert again.to_dict() == prof.to_dict()


def test_profile_rejects_bad_documents(tmp_path):
    with pytest.raises(RQError, match="not an rq profile"):
        Profile.from_dict({"format": "x"})
    good = {"format": "rq-profile", "version": 1, "model": {"num_experts": 2}, "calibration": {}, "schemes": [],
            "layers": [{"layer": 0, "load": [1, 2, 3], "gate_mass": [0, 0], "output_energy": [0, 0],
                        "output_power": [0, 0], "quant_error": {}}]}
    with pytest.raises(RQError, match=r"layers\[0\]\.load: 3 entries, expected 2"):
        Profile.from_dict(good)
    with pytest.raises(RQError, match="version"):
        Profile.from_dict({**good, "version": 99})


def test_fingerprint_ignores_volatile_keys():
    from tiny_models import tiny_config

    c = tiny_config("olmoe")
    d = c.to_dict()
    assert config_fingerprint(c) == config_fingerprint({**d, "_name_or_path": "/elsewhere", "transformers_version": "x"})
    assert config_fingerprint(c) != config_fingerprint({**d, "hidden_size": d["hidden_size"] * 2})
