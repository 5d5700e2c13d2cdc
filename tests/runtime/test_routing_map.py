"""routing_map.json v2: optional device placement and split policy; v1 maps still load."""

import pytest
import torch

from rq_tool import defaults
from rq_tool.errors import RQError
from rq_tool.runtime.routing_map import LayerMap, RoutingMap


def _map(**kw):
    lm = LayerMap(0, torch.tensor([0, 1, 0]), torch.tensor([[0, 2], [1, -1]]), torch.tensor([2, 1]),
                  ("bf16", "bf16", "int8"), kw.pop("slot_device", None))
    return RoutingMap(2, [lm], "bf16", "silu", **kw)


def test_v2_round_trip_with_placement():
    rmap = _map(slot_device=torch.tensor([0, 1, 1]), num_devices=2, split_policy=defaults.LOAD_AWARE_POLICY)
    d = rmap.to_dict()
    assert d["version"] == defaults.ROUTING_MAP_FORMAT[1] and d["num_devices"] == 2
    back = RoutingMap.from_dict(d)
    assert back.num_devices == 2 and torch.equal(back.layers[0].slot_device, torch.tensor([0, 1, 1]))
    assert back.split_policy == defaults.LOAD_AWARE_POLICY


def test_v1_map_still_loads():
    d = _map().to_dict()
    d["version"] = 1
    d.pop("num_devices")
    d["placement"] = None
    assert RoutingMap.from_dict(d).num_devices is None


@pytest.mark.parametrize("kw", [
    dict(slot_device=torch.tensor([0, 1, 2]), num_devices=2),  # device out of range
    dict(slot_device=torch.tensor([0, 1]), num_devices=2),  # wrong length
    dict(slot_device=torch.tensor([0, 1, 1])),  # slot_device without num_devices
    dict(split_policy=defaults.LOAD_AWARE_POLICY),  # load-aware without a placement
])
def test_bad_placement_is_refused(kw):
    with pytest.raises(RQError):
        RoutingMap.from_dict(_map(**kw).to_dict())
