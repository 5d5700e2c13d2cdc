"""The structural adapter, the few per-family classes, and ``get_family``.

``StructuralFamily`` covers every family whose MoE block has a fused experts module (see
``structure.py``), whatever its router, shared experts, biases, transposed or interleaved
layout; it is bound to one config (it builds the model on the meta device once to read the
structure and transformers' key conversions). Per-family subclasses exist only for what the
structure cannot tell:

- ``SoftmaxTopK`` / ``Mixtral``: the routing rule (softmax -> top-k -> renormalise), needed by
  LASER and the routing check in the tests, not by calibration or rewriting;
- ``DeepseekV3``: sigmoid + score-correction bias + group-limited top-k routing rule;
- ``GptOss``: top-k on raw logits then softmax over the k (its transposed, interleaved,
  biased experts are plain structure);
- ``Dbrx`` (``dbrx.py``): experts stored as flattened 2-D ``w1``/``v1``/``w2`` in a child module.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from ..errors import RQError
from .base import ExpertKey, MoEFamily
from .keys import KeyMap
from .structure import (ExpertsLayout, MoEBlockInfo, detect_activation, experts_flags, find_moe_blocks,
                        is_fused_experts, router_of, shared_modules, takes_routing)

_TOP_K_ATTRS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "experts_per_token")


class UnjudgedConfig(RQError):
    """This config says nothing about the family's experts: transformers cannot build it, or it
    builds no experts module (dense, or MoE layers disabled by this config)."""


def text_config(config):
    try:
        return config.get_text_config(decoder=True)
    except Exception:  # composite configs without one text config
        return config


def meta_model(config) -> nn.Module:
    """The family's CausalLM built on the meta device (no memory, no weights) for inspection."""
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config)
    except RQError:
        raise
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        raise UnjudgedConfig(f"transformers cannot build model_type {config.model_type!r} from this config "
                      f"({type(e).__name__}: {msg})") from None


class StructuralFamily(MoEFamily):
    """Adapter read from the model's own structure (module docstring of ``structure.py``)."""

    def __init__(self, config):
        self.config = config
        self.name = config.model_type
        model = meta_model(config)
        self._init_structure(model)

    # ------------------------------------------------------------------ structure
    def is_experts(self, module: nn.Module) -> bool:
        return is_fused_experts(module)

    def _init_structure(self, model: nn.Module) -> None:
        self.blocks: list[MoEBlockInfo] = find_moe_blocks(model, self.is_experts)
        if not self.blocks:
            msg, found_experts = describe_unsupported(model, self.config)
            raise (RQError if found_experts else UnjudgedConfig)(msg)
        first = model.get_submodule(self.blocks[0].path + ".experts")
        self._check_uniform()
        self.layout = self._read_layout(first)
        canon = self.canonical_experts(first)
        self._two_i = int(canon["gate_up"].shape[1])
        self._activation = self._detect_activation(first)
        self.keys = KeyMap(model, {b.path + ".experts" for b in self.blocks},
                           concat_dim=2 if self.layout.transposed else 1)
        self._layer_of_path = {b.path + ".experts": b.layer for b in self.blocks}
        foreign = self.keys.non_expert_conversions()
        if foreign:
            raise RQError(f"{self.name}: transformers reshapes non-expert tensors when loading this checkpoint "
                          f"({'; '.join(foreign[:2])}); rq copies non-expert tensors unchanged and cannot rewrite it yet")

    def _check_uniform(self) -> None:
        classes = {b.experts_class for b in self.blocks}
        if len(classes) > 1:
            raise RQError(f"{self.name}: MoE layers use different experts classes ({', '.join(sorted(classes))}); "
                          "rq needs one layout per model")

    def _read_layout(self, experts: nn.Module) -> ExpertsLayout:
        where = f"{self.name}: {type(experts).__name__} at {self.blocks[0].path}.experts"
        if not takes_routing(experts):
            raise RQError(f"{where} is called as experts(hidden_states) with the routing applied inside the block; "
                          "rq needs experts(hidden, top_k_index, top_k_weights)")
        flags = experts_flags(experts, int(getattr(text_config(self.config), "hidden_size", 0) or 0))
        if not flags["has_gate"]:
            raise RQError(f"{where} has non-gated experts (up_proj -> act -> down_proj, no gate_up_proj); rq "
                          "supports gated experts (gate_up_proj [E, 2I, H]) only")
        if flags["post_norm"]:
            raise RQError(f"{where} applies a norm after each expert, which rq's runtime does not")
        return ExpertsLayout(flags["transposed"], flags["interleaved"], flags["has_bias"])

    def _detect_activation(self, experts: nn.Module) -> str:
        try:
            return detect_activation(experts, self.layout, text_config(self.config), self._two_i)
        except RQError as e:
            raise RQError(f"{self.name}: {e}") from None

    # ------------------------------------------------------------------ model side
    def moe_blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        out = []
        for b in self.blocks:
            try:
                out.append((b.layer, model.get_submodule(b.path)))
            except AttributeError:
                raise RQError(f"{self.name}: the model has no MoE block at {b.path} (built from another config?)")
        return out

    def router(self, block: nn.Module) -> nn.Module:
        r = router_of(block)
        if r is None:
            raise RQError(f"{self.name}: cannot find the router of {type(block).__name__}")
        return r

    def shared_modules(self, block: nn.Module) -> list[nn.Module]:
        return shared_modules(block)

    def top_k(self, router: nn.Module) -> int:
        for src in (router, text_config(self.config)):
            for a in _TOP_K_ATTRS:
                v = getattr(src, a, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        raise RQError(f"{self.name}: cannot find the router's top-k")

    def activation(self, config=None) -> str:
        return self._activation

    def canonical_experts(self, experts: nn.Module) -> dict[str, torch.Tensor]:
        lay = self.layout
        out = {"gate_up": lay.to_canonical("gate_up", experts.gate_up_proj),
               "down": lay.to_canonical("down", experts.down_proj)}
        if lay.has_bias:
            out["gate_up_bias"] = lay.to_canonical("gate_up_bias", experts.gate_up_proj_bias)
            out["down_bias"] = experts.down_proj_bias
        return out

    # ------------------------------------------------------------------ checkpoint side
    def parse_expert_key(self, key: str) -> ExpertKey | None:
        ck = self.keys.classify(key)
        if ck is None:
            return None
        return ExpertKey(self._layer_of_path[ck.experts_path], ck.role, ck.expert,
                         ck.experts_path.rsplit(".", 1)[0], ck.tensor)

    def canonical_expert_tensor(self, role: str, t: torch.Tensor) -> torch.Tensor:
        # per-expert tensors are slices of the runtime parameter: transposed families store [H, I]
        if self.layout.transposed and t.dim() == 2:
            return t.transpose(0, 1)
        return t

    def canonical_from_fused(self, role: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if role not in ("gate_up", "down", "gate_up_bias", "down_bias"):
            raise RQError(f"{self.name}: unexpected fused expert tensor {role}")
        return {role: self.layout.to_canonical(role, t)}

    def runtime_key(self, disk_key: str) -> str:
        return self.keys.runtime_key(disk_key)


# ---------------------------------------------------------------------- routing rules
class SoftmaxTopK(StructuralFamily):
    """softmax over all experts -> top-k -> optional renormalisation (Qwen, OLMoE, ...)."""

    always_normalize: bool = False

    def route(self, router, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k(router), dim=-1)
        if self.always_normalize or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights


class Mixtral(SoftmaxTopK):
    always_normalize = True


class DeepseekV3(StructuralFamily):
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


class GptOss(StructuralFamily):
    """top-k on raw logits (with router bias), softmax over the k."""

    def route(self, router, logits):
        values, ids = torch.topk(logits, self.top_k(router), dim=-1)
        return ids, torch.softmax(values, dim=1, dtype=values.dtype)


def _dbrx():
    from .dbrx import Dbrx

    return Dbrx


# model_type -> adapter class; every other model_type gets StructuralFamily
FAMILY_CLASSES: dict[str, type[StructuralFamily]] = {
    "mixtral": Mixtral,
    "qwen2_moe": SoftmaxTopK,
    "qwen3_moe": SoftmaxTopK,
    "olmoe": SoftmaxTopK,
    "deepseek_v3": DeepseekV3,
    "gpt_oss": GptOss,
}
_LAZY_CLASSES = {"dbrx": _dbrx}


# ---------------------------------------------------------------------- registry
def _config_object(cfg):
    """A transformers config from a config object, a config.json dict or a model_type string."""
    from transformers import CONFIG_MAPPING

    if not isinstance(cfg, (dict, str)):
        return cfg
    model_type = cfg if isinstance(cfg, str) else cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise RQError(f"model_type {model_type!r} is not supported: the installed transformers does not know it "
                      "(`rq families` lists the MoE families rq supports)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(cfg, str):
                return CONFIG_MAPPING[model_type]()
            return config_from_dict(model_type, cfg)
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        raise RQError(f"transformers cannot read this {model_type!r} config ({type(e).__name__}: {msg})") from None


def config_from_dict(model_type: str, d: dict):
    """A config.json dict -> transformers config of ``model_type`` (special floats such as
    Infinity decoded the way ``from_pretrained`` does)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    d = cls._decode_special_floats(d) if hasattr(cls, "_decode_special_floats") else d
    return cls.from_dict({k: v for k, v in d.items() if k != "model_type"})


def _check_causal_lm(model_type: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RQError(f"model_type {model_type!r} has no causal-LM class in transformers; rq rewrites causal LMs")


def family_class(model_type: str) -> type[StructuralFamily]:
    if model_type in _LAZY_CLASSES:
        return _LAZY_CLASSES[model_type]()
    return FAMILY_CLASSES.get(model_type, StructuralFamily)


@functools.lru_cache(maxsize=16)
def _family_for(model_type: str, config_json: str, holder: "_Holder") -> MoEFamily:
    return family_class(model_type)(holder.config)


class _Holder:
    """Carries the config into the cache; equal when the serialized configs are equal."""

    def __init__(self, config, key: str):
        self.config, self.key = config, key

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Holder) and other.key == self.key


def get_family(config_or_model_type) -> MoEFamily:
    """The adapter for a config (object, config.json dict, or model_type string for its default
    config); one clear RQError naming the model_type and what is missing for anything else."""
    config = _config_object(config_or_model_type)
    model_type = config.model_type
    _check_causal_lm(model_type)
    try:
        key = config.to_json_string(use_diff=False)
    except Exception:  # unserializable attributes: no caching
        return family_class(model_type)(config)
    return _family_for(model_type, key, _Holder(config, key))


# ---------------------------------------------------------------------- errors
def _expert_counts(config) -> dict[str, int]:
    """Config attributes (sub-configs included) that count experts, e.g. {"ffn_config.moe_num_experts": 16}."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            k = str(k)
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif "expert" in k and isinstance(v, int) and not isinstance(v, bool) and v > 1 and "per_tok" not in k:
                out[prefix + k] = v

    try:
        walk(config.to_dict(), "")
    except Exception:
        pass
    return out


def describe_unsupported(model: nn.Module, config) -> tuple[str, bool]:
    """Why a model without fused experts modules is not rewritable: dense, or an MoE of another
    form; and whether it has expert modules at all (else this config says nothing of the family)."""
    mt = config.model_type
    expertish = [(n, type(m).__name__) for n, m in model.named_modules()
                 if n.rsplit(".", 1)[-1].lower().find("expert") >= 0 and n.count(".") >= 2]
    counts = _expert_counts(config)
    if not expertish and not counts:
        return f"model_type {mt!r} is a dense (non-MoE) model: no MoE experts module found", False
    if expertish:
        name, cls = expertish[0]
        what = (f"{cls} at {name} is not a fused experts module (3-D gate_up_proj [E, 2I, H] and down_proj "
                "[E, H, I] called as experts(hidden, top_k_index, top_k_weights))")
    else:
        what = f"the config counts experts ({', '.join(f'{k}={v}' for k, v in counts.items())}) but this " \
               "configuration builds no experts module"
    return f"model_type {mt!r} is an MoE model rq cannot rewrite: {what}", bool(expertish)
