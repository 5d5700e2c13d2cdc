"""Replication + quantization planner and device placement: pure functions, tensors in, a Plan out.

``make_plan`` is the entry point (strategies by name in ``STRATEGIES``); ``resolve_budget`` turns
a ``--budget`` spec into bytes; ``placement`` puts physical slots on devices for expert
parallelism; ``eplb`` reimplements DeepSeek EPLB (``rebalance_experts``) as the reference point.
"""

from .budget import resolve_budget
from .eplb import balanced_packing, rebalance_experts, replicate_experts
from .placement import device_loads, eplb_rebalance, max_mean, place_slots
from .predict import log2phy_from_phy2log, predict_layer
from .strategies import STRATEGIES, make_plan
from .types import ERROR_WEIGHTS, PLAN_FORMAT, LayerPlan, Plan, PlanOptions

__all__ = [
    "ERROR_WEIGHTS", "PLAN_FORMAT", "STRATEGIES", "LayerPlan", "Plan", "PlanOptions", "balanced_packing",
    "device_loads", "eplb_rebalance", "log2phy_from_phy2log", "make_plan", "max_mean", "place_slots",
    "predict_layer", "rebalance_experts", "replicate_experts", "resolve_budget",
]
