"""The supported MoE families (transformers 5.x) and their registry."""

from __future__ import annotations

import torch

from ..errors import RQError
from .base import MoEFamily, SoftmaxTopK


class Mixtral(SoftmaxTopK):
    always_normalize = True


class DeepseekV3(MoEFamily):
    """sigmoid scores + score-correction bias + group-limited top-k + routed scaling factor."""

    def route(self, router, logits):
        scores = logits.float().sigmoid()
        choice = scores + router.e_score_correction_bias.float()
        T, E = choice.shape
        groups = int(router.num_group)
        group_scores = choice.view(T, groups, E // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=int(router.topk_group), dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, groups, E // groups).reshape(T, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=self.top_k(router), dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * router.routed_scaling_factor


class GptOss(MoEFamily):
    """top-k on raw logits (with router bias), softmax over the k; experts transposed, interleaved."""

    def route(self, router, logits):
        values, ids = torch.topk(logits, self.top_k(router), dim=-1)
        return ids, torch.softmax(values, dim=1, dtype=values.dtype)

    def activation(self, config) -> str:
        return f"gptoss:{float(config.swiglu_alpha)!r}:{float(config.swiglu_limit)!r}"

    @staticmethod
    def _deinterleave(gate_up_t: torch.Tensor) -> torch.Tensor:
        # [E, H, 2I] interleaved (gate0, up0, gate1, ...) -> [E, 2I, H] with gate rows first
        return torch.cat([gate_up_t[..., ::2], gate_up_t[..., 1::2]], dim=-1).transpose(1, 2)

    def canonical_experts(self, experts):
        return {
            "gate_up": self._deinterleave(experts.gate_up_proj),
            "down": experts.down_proj.transpose(1, 2),
            "gate_up_bias": torch.cat([experts.gate_up_proj_bias[..., ::2], experts.gate_up_proj_bias[..., 1::2]], -1),
            "down_bias": experts.down_proj_bias,
        }

    def canonical_from_fused(self, role, t):
        if role == "gate_up":
            return {"gate_up": self._deinterleave(t)}
        if role == "down":
            return {"down": t.transpose(1, 2)}
        if role == "gate_up_bias":
            return {"gate_up_bias": torch.cat([t[..., ::2], t[..., 1::2]], -1)}
        if role == "down_bias":
            return {"down_bias": t}
        raise ValueError(f"gpt-oss: unexpected fused expert tensor {role}")


_MIXTRAL_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}

FAMILIES: dict[str, MoEFamily] = {
    f.name: f
    for f in (
        Mixtral("mixtral", ("mixtral",), disk_parts=_MIXTRAL_PARTS, disk_renames=((".block_sparse_moe.", ".mlp."),)),
        SoftmaxTopK("qwen2_moe", ("qwen2_moe",), shared_attrs=("shared_expert",)),
        SoftmaxTopK("qwen3_moe", ("qwen3_moe",)),
        SoftmaxTopK("olmoe", ("olmoe",)),
        DeepseekV3("deepseek_v3", ("deepseek_v3",), shared_attrs=("shared_experts",)),
        GptOss("gpt_oss", ("gpt_oss",), router_attr="router", has_expert_bias=True),
    )
}

_BY_MODEL_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def get_family(config_or_model_type) -> MoEFamily:
    """The adapter for a config (or a model_type string); one clear error for anything else."""
    cfg = config_or_model_type
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", cfg)
    fam = _BY_MODEL_TYPE.get(model_type)
    if fam is not None:
        return fam
    supported = ", ".join(supported_model_types())
    if isinstance(config_or_model_type, str):
        raise RQError(f"unsupported model_type {model_type!r}; rq supports: {supported}")
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    is_moe = any((cfg.get(a) if isinstance(cfg, dict) else getattr(cfg, a, None)) for a in keys)
    what = "an MoE family rq does not support yet" if is_moe else "a dense (non-MoE) model"
    raise RQError(f"model_type {model_type!r} is {what}; rq supports: {supported}")
