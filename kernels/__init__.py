"""Replica-aware MoE kernels (packaged as ``rq_tool.kernels``), each with a pure-torch reference.

- :func:`replica_dispatch`: logical top-k ids -> physical slots (round-robin by occurrence),
  grouped into padded blocks (vLLM ``moe_align_block_size`` contract) -> :class:`Dispatch`.
- :func:`moe_experts`: grouped expert compute over a layer's physical slots (:class:`SlotWeights`,
  float / int8 / nf4 groups) and the weighted combine -> ``y [T, H]``.

Implementation switch: argument ``impl`` ("triton" / "torch" / None) or env ``RQ_KERNEL``
(triton / torch / auto, default auto = Triton for CUDA tensors when triton is importable). Triton is
imported lazily; on CPU it runs only under ``TRITON_INTERPRET=1`` (tests).
"""

from .backend import resolve_impl, triton_available
from .dispatch import replica_dispatch, replica_dispatch_reference
from .experts import moe_experts, moe_experts_grouped, moe_experts_reference
from .types import Dispatch, SlotWeights

__all__ = [
    "Dispatch",
    "SlotWeights",
    "moe_experts",
    "moe_experts_grouped",
    "moe_experts_reference",
    "replica_dispatch",
    "replica_dispatch_reference",
    "resolve_impl",
    "triton_available",
]
