"""LASER routing: peaked gates keep vanilla top-k exactly, flat gates spread load; one owner."""

import pytest
import torch

from rq_tool.arch import get_family
from rq_tool.errors import RQError
from rq_tool.eval.measure import ExpertCounter
from rq_tool.eval.laser import LaserConfig, LaserRouting, laser_route
from tiny_models import tiny_model


def _ids_seen(model, family, ids, cfg=None):
    """Logical ids each experts module received: ``[L] x [T, K]`` (and the logits)."""
    seen = []
    hooks = [b.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
             for _, b in family.moe_blocks(model)]
    try:
        with torch.inference_mode():
            if cfg is None:
                logits = model(input_ids=ids).logits
            else:
                with LaserRouting(model, family, cfg):
                    logits = model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def test_pure_rule_peaked_keeps_vanilla_flat_spreads():
    T, E, K = 12, 8, 2
    peaked = torch.full((T, E), 0.02)
    peaked[:, 0], peaked[:, 1] = 0.5, 0.38
    vanilla = peaked.topk(K, dim=-1).indices
    ids, rerouted = laser_route(peaked, vanilla, LaserConfig(eps_high=0.5, t_fix=0.3))
    assert torch.equal(ids, vanilla) and not rerouted.any()
    flat = torch.full((T, E), 1.0 / E)
    flat[:, :4] += 1e-4 * torch.arange(4, 0, -1)  # experts 0 > 1 > 2 > 3 by a hair
    vanilla = flat.topk(K, dim=-1).indices
    ids, rerouted = laser_route(flat, vanilla, LaserConfig(eps_high=0.5, t_fix=0.3, num_candidates=4))
    assert rerouted.all()
    # token 0 takes the top two (nothing loaded yet), token 1 the next two, then alternate
    assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [2, 3] and ids[2].tolist() == [0, 1]
    before = torch.bincount(vanilla.reshape(-1), minlength=E).max()
    after = torch.bincount(ids.reshape(-1), minlength=E).max()
    assert int(after) == T * K // 4 < int(before) == T


def test_model_peaked_router_keeps_topk_exactly():
    model = tiny_model("qwen3_moe")
    family = get_family(model.config)
    with torch.no_grad():
        for _, block in family.moe_blocks(model):
            block.gate.weight.mul_(200.0)  # very confident gates: top-2 mass ~ 1
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    vanilla, logits0 = _ids_seen(model, family, ids)
    laser, logits1 = _ids_seen(model, family, ids, LaserConfig(eps_high=0.5, t_fix=0.3))
    assert all(torch.equal(a, b) for a, b in zip(vanilla, laser))
    assert torch.equal(logits0, logits1)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "olmoe", "mixtral", "gpt_oss"])
def test_model_flat_router_moves_tokens_to_less_loaded(model_type):
    model = tiny_model(model_type)
    family = get_family(model.config)
    with torch.no_grad():
        for _, block in family.moe_blocks(model):
            router = family.router(block)
            router.weight.zero_()  # every expert equally likely: vanilla top-k piles onto the same ids
            if getattr(router, "bias", None) is not None:
                router.bias.zero_()
    ids = torch.randint(0, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    vanilla, _ = _ids_seen(model, family, ids)
    laser, _ = _ids_seen(model, family, ids, LaserConfig(eps_high=0.9, t_fix=0.5, num_candidates=8))
    E = 8
    for v, l in zip(vanilla, laser):
        max_laser = int(torch.bincount(l.reshape(-1), minlength=E).max())
        assert max_laser < int(torch.bincount(v.reshape(-1), minlength=E).max())
        assert max_laser <= -(-l.numel() // E)  # perfectly spread


def test_weights_renormalised_like_the_family():
    for model_type, normalised in (("qwen3_moe", True), ("olmoe", False)):
        model = tiny_model(model_type)
        family = get_family(model.config)
        router = family.router(family.moe_blocks(model)[0][1])
        h = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode(), LaserRouting(model, family, LaserConfig(eps_high=1.0, t_fix=0.0)) as las:
            logits, w, ids = router(h)
        probs = torch.softmax(logits.float(), -1)
        expect = probs.gather(1, ids)
        if normalised:
            expect = expect / expect.sum(-1, keepdim=True)
        torch.testing.assert_close(w.float(), expect, rtol=1e-6, atol=1e-6)
        assert las.stats[0]["tokens"] == 40 and las.stats[0]["rerouted"] == 40


def test_one_owner_restored_and_refuses_double_patch():
    model = tiny_model("qwen3_moe")
    family = get_family(model.config)
    routers = [family.router(b) for _, b in family.moe_blocks(model)]
    with pytest.raises(RuntimeError):
        with LaserRouting(model, family):
            assert all("forward" in r.__dict__ for r in routers)
            raise RuntimeError("boom")
    assert all("forward" not in r.__dict__ for r in routers)
    with LaserRouting(model, family):
        with pytest.raises(RQError, match="already patched"):
            with LaserRouting(model, family):
                pass
        assert all("forward" in r.__dict__ for r in routers)  # the outer owner's patch survives
    assert all("forward" not in r.__dict__ for r in routers)


def test_config_checks_and_unsupported_family():
    assert LaserConfig.from_dict(LaserConfig(0.3, 0.2, 6).to_dict()) == LaserConfig(0.3, 0.2, 6)
    with pytest.raises(RQError):
        LaserConfig(eps_high=1.5)
    with pytest.raises(RQError, match="num_candidates > top-k"):
        LaserConfig(num_candidates=2).candidates(2, 8)
    model = tiny_model("deepseek_v3")
    with pytest.raises(RQError, match="not defined for the deepseek_v3"):
        LaserRouting(model, get_family(model.config))


def test_counter_sees_laser_ids():
    model = tiny_model("qwen3_moe")
    family = get_family(model.config)
    ids = torch.randint(0, 90, (2, 16), generator=torch.Generator().manual_seed(0))
    seen, _ = _ids_seen(model, family, ids, LaserConfig(eps_high=1.0, t_fix=0.0))
    with torch.inference_mode(), ExpertCounter(model, family) as counter, LaserRouting(model, family,
                                                                                        LaserConfig(1.0, 0.0)):
        counter.start_batch()
        model(input_ids=ids)
    for s, got in zip(seen, counter.batch_load):
        assert torch.equal(torch.bincount(s.reshape(-1), minlength=8), got)
