"""What rq needs to know about one MoE family: the adapter interface every reader relies on.

Legend: T tokens, K top-k, E logical experts, H hidden, I expert intermediate size.

rq works on a *canonical* per-expert form, identical for all families:

    gate_up [E, 2I, H]  (rows 0..I-1 = gate, I..2I-1 = up; nn.Linear layout)
    down    [E, H, I]
    gate_up_bias [E, 2I], down_bias [E, H]   (only families with expert biases)

and an activation spec (``activation.py``). An adapter (``MoEFamily``) maps a model and its
checkpoint onto that form. Most families need no code: ``StructuralFamily`` (``families.py``)
reads the MoE blocks from the model itself (``structure.py``) and the on-disk key names from
transformers' conversion mapping (``keys.py``). Subclasses exist only where routing or layout
truly differ (see ``families.py``).

The interface (stable; rewrite, calibration and runtime code call only these):

model side (on a loaded CausalLM)
    ``moe_blocks(model) -> [(layer, block)]``   absolute decoder-layer index and the MoE block;
                                                ``block.experts`` is the routed experts module,
                                                called ``experts(hidden [T, H], top_k_index [T, K],
                                                top_k_weights [T, K])`` (hidden may be ``[B, S, H]``)
    ``router(block)``, ``shared_modules(block)``, ``top_k(router)``
    ``canonical_experts(experts) -> {gate_up, down[, gate_up_bias, down_bias]}``  canonical views
    ``activation(config) -> str``               the expert activation spec
    ``route(router, logits [T, E]) -> (ids [T, K], weights [T, K])``  the routing rule, where rq
                                                models it (LASER, tests); RQError otherwise.
                                                Calibration never needs it: it records what the
                                                model's own router chose.

checkpoint side (safetensors keys, no model needed by the caller)
    ``parse_expert_key(key) -> ExpertKey | None``   a routed-expert tensor, or None for any other
    ``canonical_expert_tensor(role, t) -> t``       one per-expert on-disk tensor (``expert`` set)
                                                    -> canonical orientation (gate/up ``[I, H]``,
                                                    gate_up ``[2I, H]``, down ``[H, I]``)
    ``canonical_from_fused(role, t) -> dict``        a fused on-disk tensor ``[E, ...]`` ->
                                                    canonical entries (e.g. ``{"gate_up": ...}``)
    ``runtime_key(key) -> str``                     a non-expert on-disk key -> the runtime
                                                    state-dict key (idempotent on runtime keys;
                                                    ``runtime_key(ek.block_prefix + ".experts.")``
                                                    is the runtime prefix of a layer's experts)

``ExpertKey.tensor`` is ``"weight"`` / ``"bias"`` for plain tensors, or the suffix of a
quantization side tensor (``"weight_scale_inv"`` for FP8 block scales, ``"blocks"`` / ``"scales"``
for MXFP4): readers that do not dequantize must refuse keys whose tensor is neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RQError


@dataclass(frozen=True)
class ExpertKey:
    """A parsed checkpoint key of a routed expert tensor."""

    layer: int
    role: str  # gate | up | down | gate_up | gate_bias | up_bias | gate_up_bias | down_bias
    expert: int | None  # None for fused [E, ...] tensors
    block_prefix: str  # runtime path of the MoE block, e.g. "model.layers.3.mlp"
    tensor: str = "weight"  # weight | bias | a quantization side tensor (weight_scale_inv, blocks, scales)

    @property
    def quantized_part(self) -> bool:
        """A quantization side tensor (scales, packed blocks), not a plain weight or bias."""
        return self.tensor not in ("weight", "bias")


class MoEFamily:
    """Adapter interface (see module docstring); ``StructuralFamily`` implements it for most families."""

    name: str = "?"

    # ------------------------------------------------------------------ model side
    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        raise NotImplementedError

    def router(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def shared_modules(self, block: nn.Module) -> list[nn.Module]:
        return []

    def top_k(self, router: nn.Module) -> int:
        return int(router.top_k)

    def route(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RQError(f"the routing rule of {self.name} is not modelled by rq (calibration records the router's "
                      "own choices; LASER and routing-rule checks need it)")

    def activation(self, config) -> str:
        raise NotImplementedError

    def canonical_experts(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoint side
    def parse_expert_key(self, key: str) -> ExpertKey | None:
        raise NotImplementedError

    def canonical_expert_tensor(self, role: str, t: torch.Tensor) -> torch.Tensor:
        return t

    def canonical_from_fused(self, role: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def runtime_key(self, disk_key: str) -> str:
        return disk_key
