"""Model-family adapters: where routers and experts live, routing rules, layouts, key names."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "activation_fn": ".activation", "expert_forward": ".activation",
    "ExpertKey": ".base", "MoEFamily": ".base",
    "FAMILY_CLASSES": ".families", "StructuralFamily": ".families", "get_family": ".families",
})
__all__ = [
    "FAMILY_CLASSES", "ExpertKey", "MoEFamily", "StructuralFamily", "activation_fn", "expert_forward", "get_family",
]
