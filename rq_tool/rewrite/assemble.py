"""Collect one MoE layer's expert tensors from a stream of checkpoint keys into canonical form.

Canonical (see ``rq_tool/arch/base.py``): ``gate_up [E, 2I, H]``, ``down [E, H, I]`` and, for
families with expert biases, ``gate_up_bias [E, 2I]``, ``down_bias [E, H]``.
"""

from __future__ import annotations

import torch

from ..arch import ExpertKey, MoEFamily
from ..errors import RQError


class LayerAssembler:
    """Receives the expert tensors of one layer in any order; ``done`` once every key arrived."""

    def __init__(self, layer: int, expected_keys: set[str], family: MoEFamily, num_experts: int):
        self.layer = layer
        self.pending = set(expected_keys)
        self.family = family
        self.E = num_experts
        self.per_expert: dict[str, dict[int, torch.Tensor]] = {}
        self.fused: dict[str, torch.Tensor] = {}

    @property
    def done(self) -> bool:
        return not self.pending

    def add(self, key: str, ek: ExpertKey, tensor: torch.Tensor) -> None:
        self.pending.discard(key)
        if ek.quantized_part:
            raise RQError(f"layer {self.layer}: {key} is a quantized expert tensor ({ek.tensor}); rq reads "
                          "F32/BF16/F16 expert weights only")
        if ek.expert is None:
            self.fused.update(self.family.canonical_from_fused(ek.role, tensor))
        else:
            self.per_expert.setdefault(ek.role, {})[ek.expert] = self.family.canonical_expert_tensor(ek.role, tensor)

    def canonical(self) -> dict[str, torch.Tensor]:
        if self.pending:
            raise RQError(f"layer {self.layer}: expert tensors missing from the checkpoint: {sorted(self.pending)[:3]}")
        out = dict(self.fused)
        pe = self.per_expert

        def stack(role):
            parts = pe[role]
            if sorted(parts) != list(range(self.E)):
                raise RQError(f"layer {self.layer}: expert {role} tensors incomplete on disk")
            return torch.stack([parts[e] for e in range(self.E)])

        if "gate" in out and "up" in out:  # fused gate and up tensors (DBRX)
            out["gate_up"] = torch.cat([out.pop("gate"), out.pop("up")], dim=1)
        if "gate" in pe and "up" in pe:
            out["gate_up"] = torch.cat([stack("gate"), stack("up")], dim=1)
        elif "gate_up" in pe:
            out["gate_up"] = stack("gate_up")
        if "down" in pe:
            out["down"] = stack("down")
        if "gate_bias" in pe and "up_bias" in pe:
            out["gate_up_bias"] = torch.cat([stack("gate_bias"), stack("up_bias")], dim=1)
        if "down_bias" in pe:
            out["down_bias"] = stack("down_bias")
        if "gate_up" not in out or "down" not in out:
            raise RQError(f"layer {self.layer}: could not assemble gate/up/down expert weights")
        return out
