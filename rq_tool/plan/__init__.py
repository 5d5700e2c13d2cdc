"""Replication + quantization planner and device placement: pure functions, tensors in, a Plan out.

``make_plan`` is the entry point (strategies by name in ``STRATEGIES``); ``resolve_budget`` turns
a ``--budget`` spec into bytes; ``placement`` puts physical slots on devices for expert
parallelism; ``eplb`` reimplements DeepSeek EPLB (``rebalance_experts``) as the reference point.
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "resolve_budget": ".budget",
    "balanced_packing": ".eplb", "rebalance_experts": ".eplb", "replicate_experts": ".eplb",
    "device_loads": ".placement", "max_mean": ".placement",
    "place_slots": ".placement",
    "log2phy_from_phy2log": ".predict", "predict_layer": ".predict",
    "STRATEGIES": ".strategies", "make_plan": ".strategies",
    "ERROR_WEIGHTS": ".types", "PLAN_FORMAT": ".types", "LayerPlan": ".types", "Plan": ".types",
    "PlanOptions": ".types",
})
__all__ = [
    "ERROR_WEIGHTS", "PLAN_FORMAT", "STRATEGIES", "LayerPlan", "Plan", "PlanOptions", "balanced_packing",
    "device_loads", "log2phy_from_phy2log", "make_plan", "max_mean", "place_slots",
    "predict_layer", "rebalance_experts", "replicate_experts", "resolve_budget",
]
