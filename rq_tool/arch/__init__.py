"""Model-family adapters: where routers and experts live, routing rules, layouts, key names."""

from .activation import activation_fn, expert_forward
from .base import ExpertKey, MoEFamily
from .families import FAMILY_CLASSES, StructuralFamily, get_family

__all__ = [
    "FAMILY_CLASSES",
    "ExpertKey",
    "MoEFamily",
    "StructuralFamily",
    "activation_fn",
    "expert_forward",
    "get_family",
]
