"""LASER: a plug-and-play, load-aware routing policy applied at inference (arXiv 2510.03293).

Legend: T tokens in one forward (the batch, flattened sequence-major), E experts, K top-k,
C candidate cap.

LASER leaves the model's weights alone and only changes which experts a token goes to. The rule
rq implements, per MoE layer and per forward call (one "batch"):

1. ``p [T, E]``: the gate's probabilities, ``softmax(router_logits)`` over all experts (the
   router's own logits; for gpt-oss they include the router bias).
2. ``M_k = sum of the K largest p``. If ``M_k >= eps_high`` the gate has a clear preference and
   the token keeps the router's own output unchanged (ids and weights bit-equal to vanilla).
3. Otherwise the candidates are the experts with ``p >= t_fix * max(p)``, trimmed to the ``C``
   highest by ``p`` (``C > K``). If fewer than ``K + 1`` experts qualify there is nothing to
   choose and the token keeps vanilla top-k.
4. Tokens are processed in order (token 0 of sequence 0 first). The load of an expert is the
   number of token-slots of this batch already assigned to it (vanilla tokens included). A flat
   token goes to the ``K`` least-loaded candidates (ties: higher ``p`` first); its ids are then
   listed by decreasing ``p``, like the router's own top-k.
5. Weights: the chosen experts' gate probabilities, renormalised exactly as the family does for
   its own top-k (softmax families: ``p`` gathered, divided by their sum when the router
   renormalises -- Mixtral always, Qwen/OLMoE when ``norm_topk_prob``; gpt-oss: softmax over the
   chosen experts' logits), cast to the router's output dtype.

The paper tunes ``eps_high``, ``t_fix`` and ``C`` per model, dataset and layer band; rq uses one
setting for all layers (``LaserConfig``). DeepSeek-V3 routing (sigmoid scores, score-correction
bias, group-limited top-k) has no agreed LASER variant and is refused.

``LaserRouting`` is the one owner of the patched routers: it installs the policy on entry,
always restores the routers on exit, and refuses a router someone else already patched.
"""

from __future__ import annotations

import types
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from .. import defaults
from ..arch import MoEFamily
from ..arch.families import GptOss, SoftmaxTopK
from ..errors import RQError


@dataclass(frozen=True)
class LaserConfig:
    """LASER thresholds. ``num_candidates`` ``None`` means ``2 * K`` (capped at E)."""

    VERSION: ClassVar[int] = 1

    # top-k mass at or above which a token keeps vanilla routing. Model-dependent (the paper
    # tunes it per model); 0.3 kept perplexity within ~1% on the bundled top-2-of-16 model's
    # calibration set, and ``scripts/laser_tuning.py`` picks one on calibration data.
    eps_high: float = defaults.LASER_EPS_HIGH
    t_fix: float = defaults.LASER_T_FIX  # candidate if p >= t_fix * max(p)
    num_candidates: int | None = None  # C > K

    def __post_init__(self):
        if not 0.0 <= self.eps_high <= 1.0:
            raise RQError(f"LASER eps_high must be in [0, 1], got {self.eps_high}")
        if not 0.0 <= self.t_fix <= 1.0:
            raise RQError(f"LASER t_fix must be in [0, 1], got {self.t_fix}")
        if self.num_candidates is not None and int(self.num_candidates) < 2:
            raise RQError(f"LASER num_candidates must be >= 2 (and > top-k), got {self.num_candidates}")

    def candidates(self, top_k: int, num_experts: int) -> int:
        c = 2 * top_k if self.num_candidates is None else int(self.num_candidates)
        c = min(c, num_experts)
        if c <= top_k:
            raise RQError(f"LASER needs num_candidates > top-k ({top_k}) and <= {num_experts} experts, got {c}")
        return c

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LaserConfig":
        d = dict(d)
        if d.pop("version", cls.VERSION) != cls.VERSION:
            raise RQError(f"LASER config version is not supported (expected {cls.VERSION})")
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise RQError(f"unknown LASER option(s): {', '.join(sorted(set(d) - known))}")
        return cls(**d)


def _gate_probs(family: MoEFamily, logits: torch.Tensor) -> torch.Tensor:
    """``logits [T, E]`` -> gate probabilities ``[T, E]`` float32."""
    return torch.softmax(logits.float(), dim=-1)


def _weights(family: MoEFamily, router: nn.Module, logits: torch.Tensor, probs: torch.Tensor,
             ids: torch.Tensor) -> torch.Tensor:
    """The family's weights for chosen ``ids [T, K]`` (see rule 5 of the module docstring)."""
    if isinstance(family, GptOss):
        return torch.softmax(logits.gather(1, ids), dim=1, dtype=logits.dtype)
    w = probs.gather(1, ids)
    if getattr(family, "always_normalize", False) or getattr(router, "norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def check_supported(family: MoEFamily) -> None:
    if not isinstance(family, (SoftmaxTopK, GptOss)):
        raise RQError(f"LASER routing is not defined for the {family.name} family (sigmoid, group-limited routing); "
                      "supported: softmax-gated families and gpt-oss")


def laser_route(probs: torch.Tensor, vanilla_ids: torch.Tensor,
                config: LaserConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The LASER assignment of one batch (rules 2-4), pure.

    ``probs [T, E]`` gate probabilities, ``vanilla_ids [T, K]`` the router's own top-k. Returns
    ``ids [T, K]`` int64 and ``rerouted [T]`` bool (tokens whose rule-3 candidate set had a choice;
    their ids may still equal vanilla when the top experts were also the least loaded).
    """
    T, E = probs.shape
    K = vanilla_ids.shape[1]
    C = config.candidates(K, E)
    top_mass = probs.topk(K, dim=-1).values.sum(-1)
    cand_p, cand_ids = probs.topk(C, dim=-1)  # sorted by p, descending
    qualifies = cand_p >= config.t_fix * cand_p[:, :1]
    flat = (top_mass < config.eps_high) & (qualifies.sum(-1) > K)
    ids = vanilla_ids.clone().long()
    if not bool(flat.any()):
        return ids, flat
    flat_l = flat.tolist()
    vanilla_l = vanilla_ids.tolist()
    cand_l = cand_ids.tolist()
    ncand_l = qualifies.sum(-1).tolist()
    load = [0] * E
    out = ids.tolist()
    for t in range(T):
        if flat_l[t]:
            cands = cand_l[t][: ncand_l[t]]
            # least-loaded first; ties keep the higher-probability candidate (its rank in cands)
            chosen = sorted(range(len(cands)), key=lambda r: (load[cands[r]], r))[:K]
            row = [cands[r] for r in sorted(chosen)]  # listed by decreasing p
            out[t] = row
        else:
            row = vanilla_l[t]
        for e in row:
            load[e] += 1
    return torch.tensor(out, dtype=torch.int64, device=vanilla_ids.device), flat


class LaserRouting:
    """Context manager: every MoE router of ``model`` routes with LASER while inside.

    ``stats[i]`` counts, for the i-th MoE layer, ``tokens`` seen and ``rerouted`` (tokens whose
    flat gate let LASER choose) since entry.
    """

    def __init__(self, model: nn.Module, family: MoEFamily, config: LaserConfig = LaserConfig()):
        check_supported(family)
        self.model, self.family, self.config = model, family, config
        self.blocks = family.moe_blocks(model)
        self.stats = [{"layer": layer, "tokens": 0, "rerouted": 0} for layer, _ in self.blocks]
        self._patched: list[nn.Module] = []

    def __enter__(self) -> "LaserRouting":
        try:
            for (layer, block), st in zip(self.blocks, self.stats):
                router = self.family.router(block)
                if "forward" in router.__dict__:
                    raise RQError(f"layer {layer}: the router's forward is already patched by another owner")
                router.forward = types.MethodType(self._make_forward(router, type(router).forward, st), router)
                self._patched.append(router)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for router in self._patched:
            router.__dict__.pop("forward", None)
        self._patched.clear()

    def _make_forward(self, router: nn.Module, vanilla_forward, st: dict):
        family, config = self.family, self.config

        def forward(module, hidden_states, *args, **kwargs):
            logits, weights, ids = vanilla_forward(module, hidden_states, *args, **kwargs)
            probs = _gate_probs(family, logits)
            new_ids, rerouted = laser_route(probs, ids, config)
            st["tokens"] += int(ids.shape[0])
            st["rerouted"] += int(rerouted.sum())
            if not bool(rerouted.any()):
                return logits, weights, ids
            new_w = _weights(family, module, logits, probs, new_ids).to(weights.dtype)
            keep = ~rerouted[:, None]
            return logits, torch.where(keep, weights, new_w), torch.where(keep, ids, new_ids.to(ids.dtype))

        return forward
