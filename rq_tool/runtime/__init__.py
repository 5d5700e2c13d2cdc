"""What loads a rewritten model: routing map, RQ experts module, HF remote-code entry."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "RQExperts": ".experts",
    "load": ".hf",
    "LayerMap": ".routing_map", "RoutingMap": ".routing_map",
})
__all__ = ["LayerMap", "RQExperts", "RoutingMap", "load"]
