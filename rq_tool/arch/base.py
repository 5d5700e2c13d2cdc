"""What rq needs to know about one MoE family in transformers 5.x.

Legend: T tokens, K top-k, E logical experts, H hidden, I expert intermediate size.

Every supported family keeps a sparse block per decoder layer (``layer.mlp``) holding a router
(``gate`` or ``router``), a fused experts module (``experts``, called as
``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``) and possibly shared experts.
rq works on a *canonical* per-expert form, identical for all families:

    gate_up [E, 2I, H]  (rows 0..I-1 = gate, I..2I-1 = up; nn.Linear layout)
    down    [E, H, I]
    gate_up_bias [E, 2I], down_bias [E, H]   (only families with expert biases)

and an activation spec (see ``activation.py``). Families differ in how routers turn logits into
top-k, in the runtime tensor layout (gpt-oss: transposed, interleaved gate/up, biases) and in
the checkpoint key names on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# A checkpoint key of a routed expert tensor, per-expert (most families) or fused (gpt-oss):
#   model.layers.3.mlp.experts.5.gate_proj.weight      model.layers.3.mlp.experts.gate_up_proj
_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>[A-Za-z_]+))\.experts\."
    r"(?:(?P<expert>\d+)\.(?P<part>[A-Za-z0-9_]+)\.(?P<kind>weight|bias)|(?P<fused>[A-Za-z_]+))$"
)


@dataclass(frozen=True)
class ExpertKey:
    """A parsed checkpoint key of a routed expert tensor."""

    layer: int
    role: str  # gate | up | down | gate_up | gate_up_bias | down_bias
    expert: int | None  # None for fused [E, ...] tensors
    block_prefix: str  # e.g. "model.layers.3.mlp" as found on disk


@dataclass(frozen=True)
class MoEFamily:
    """Adapter for one MoE family. Subclasses override ``route`` and layout hooks."""

    name: str
    model_types: tuple[str, ...]
    router_attr: str = "gate"
    shared_attrs: tuple[str, ...] = ()
    # per-expert on-disk part names -> canonical role
    disk_parts: dict[str, str] = field(default_factory=lambda: {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"})
    # on-disk substring -> runtime substring for non-expert keys (transformers' WeightRenaming)
    disk_renames: tuple[tuple[str, str], ...] = ()
    has_expert_bias: bool = False

    # ---------------------------------------------------------------- model structure
    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """``[(absolute layer index, sparse block)]`` for every MoE layer of a CausalLM."""
        layers = _decoder_layers(model)
        out = []
        for i, layer in enumerate(layers):
            block = getattr(layer, "mlp", None)
            if block is not None and hasattr(block, "experts") and hasattr(block, self.router_attr):
                out.append((i, block))
        return out

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attr)

    def shared_modules(self, block: nn.Module) -> list[nn.Module]:
        return [getattr(block, a) for a in self.shared_attrs if getattr(block, a, None) is not None]

    def top_k(self, router: nn.Module) -> int:
        return int(router.top_k)

    # ---------------------------------------------------------------- routing rule
    def route(self, router: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's rule: ``logits [T, E]`` -> ``(top_k_index [T, K], top_k_weights [T, K])``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- expert layout
    def activation(self, config) -> str:
        return f"glu:{config.hidden_act}"

    def canonical_experts(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        """Runtime experts module -> canonical tensors (see module docstring); views when possible."""
        return {"gate_up": experts.gate_up_proj, "down": experts.down_proj}

    def canonical_from_fused(self, role: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fused on-disk tensor ``[E, ...]`` -> canonical entries (same convention as runtime)."""
        if role in ("gate_up", "down"):
            return {role: t}
        raise ValueError(f"{self.name}: unexpected fused expert tensor {role}")

    # ---------------------------------------------------------------- checkpoint keys
    def parse_expert_key(self, key: str) -> ExpertKey | None:
        """Classify an on-disk key: a routed expert tensor -> ExpertKey, anything else -> None."""
        m = _EXPERT_KEY.match(key)
        if not m:
            return None
        layer = int(m["layer"])
        if m["fused"] is not None:
            role = {"gate_up_proj": "gate_up", "down_proj": "down", "gate_up_proj_bias": "gate_up_bias",
                    "down_proj_bias": "down_bias"}.get(m["fused"])
            return None if role is None else ExpertKey(layer, role, None, m["prefix"])
        role = self.disk_parts.get(m["part"])
        if role is None:
            return None
        if m["kind"] == "bias":
            role = f"{role}_bias"
        return ExpertKey(layer, role, int(m["expert"]), m["prefix"])

    def runtime_key(self, disk_key: str) -> str:
        """On-disk non-expert key -> the runtime module's state-dict key."""
        for old, new in self.disk_renames:
            disk_key = disk_key.replace(old, new)
        return disk_key


class SoftmaxTopK(MoEFamily):
    """softmax over all experts -> top-k -> optional renormalisation (Mixtral, Qwen, OLMoE)."""

    always_normalize: bool = False

    def route(self, router, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k(router), dim=-1)
        if self.always_normalize or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AttributeError("model has no .model.layers")
    return layers
