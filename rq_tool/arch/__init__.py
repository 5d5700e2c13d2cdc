"""Model-family adapters: where routers and experts live, routing rules, layouts, key names."""

from .activation import activation_fn, expert_forward
from .base import ExpertKey, MoEFamily
from .families import FAMILIES, get_family, supported_model_types

__all__ = [
    "FAMILIES",
    "ExpertKey",
    "MoEFamily",
    "activation_fn",
    "expert_forward",
    "get_family",
    "supported_model_types",
]
