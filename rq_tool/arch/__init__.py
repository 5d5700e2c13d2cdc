"""Model-family adapters: where routers and experts live, routing rules, layouts, key names."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "activation_fn": ".activation", "expert_forward": ".activation",
    "ExpertKey": ".base", "MoEFamily": ".base",
    "FAMILIES": ".families", "get_family": ".families", "supported_model_types": ".families",
})
__all__ = [
    "FAMILIES", "ExpertKey", "MoEFamily", "activation_fn", "expert_forward", "get_family",
    "supported_model_types",
]
