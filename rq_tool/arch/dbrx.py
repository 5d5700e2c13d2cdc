"""DBRX: the one family whose experts layout truly differs from the fused form.

``DbrxExperts`` (``transformer.blocks.<i>.ffn.experts``) keeps its weights in a child module
``mlp`` as flattened 2-D parameters, all ``[E*I, H]``:

    w1 = gate rows of every expert, v1 = up rows, w2 = the *transposed* down projections

and its forward takes ``hidden [B, S, H]`` (not flattened) with ``top_k_index [B*S, K]``.
Routing, shared experts (none) and on-disk names (the runtime names, no conversion) need
nothing else. Legend: E experts, I expert intermediate size (``ffn_hidden_size``), H hidden size (``d_model``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import RQError
from .activation import activation_fn
from .base import ExpertKey
from .families import SoftmaxTopK
from .structure import ExpertsLayout, act_names, probe_rows

_DISK = re.compile(r"^(?P<path>.+\.experts)\.mlp\.(?P<w>w1|v1|w2)$")
_ROLE = {"w1": "gate", "v1": "up", "w2": "down"}


class Dbrx(SoftmaxTopK):
    """softmax -> top-k -> p-norm renormalisation (``moe_normalize_expert_weights``)."""

    def is_experts(self, module: nn.Module) -> bool:
        mlp = getattr(module, "mlp", None)
        return mlp is not None and all(getattr(mlp, w, None) is not None and getattr(mlp, w).dim() == 2
                                       for w in ("w1", "v1", "w2"))

    def _read_layout(self, experts):
        ffn = self.config.ffn_config
        self._E, self._I, self._H = int(ffn.moe_num_experts), int(ffn.ffn_hidden_size), int(self.config.d_model)
        return ExpertsLayout()

    def _detect_activation(self, experts) -> str:
        act = experts.mlp.activation_fn
        name = (self.config.ffn_config.ffn_act_fn or {}).get("name", "silu")
        h = probe_rows(2 * self._I)
        gate, up = h.chunk(2, dim=-1)
        want = act(gate) * up
        for n in dict.fromkeys([name, *act_names(act)]):
            spec = f"glu:{n}"
            try:
                if torch.allclose(activation_fn(spec)(h), want, rtol=1e-5, atol=1e-5):
                    return spec
            except RQError:
                continue
        raise RQError(f"dbrx: its expert activation {name!r} is none rq can compute")

    def top_k(self, router) -> int:
        return int(self.config.ffn_config.moe_top_k)

    def route(self, router, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k(router), dim=-1)
        p = self.config.ffn_config.moe_normalize_expert_weights
        if p is not None:
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
        return ids, weights

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self._E, self._I, self._H)

    def canonical_experts(self, experts):
        mlp = experts.mlp
        return {"gate_up": torch.cat([self._split(mlp.w1), self._split(mlp.v1)], dim=1),
                "down": self._split(mlp.w2).transpose(1, 2)}

    def parse_expert_key(self, key: str) -> ExpertKey | None:
        m = _DISK.match(key)
        if m is None or m["path"] not in self._layer_of_path:
            return None
        return ExpertKey(self._layer_of_path[m["path"]], _ROLE[m["w"]], None, m["path"].rsplit(".", 1)[0])

    def canonical_from_fused(self, role, t):
        if role in ("gate", "up"):
            return {role: self._split(t)}
        if role == "down":
            return {"down": self._split(t).transpose(1, 2)}
        raise RQError(f"dbrx: unexpected fused expert tensor {role}")
