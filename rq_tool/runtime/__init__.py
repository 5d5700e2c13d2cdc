"""What loads a rewritten model: routing map, RQ experts module, HF remote-code entry."""

from .experts import RQExperts
from .hf import load
from .routing_map import LayerMap, RoutingMap

__all__ = ["LayerMap", "RQExperts", "RoutingMap", "load"]
