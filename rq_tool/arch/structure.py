"""Recognise MoE blocks from the model itself: where the experts are and how they are stored.

Legend: E experts, H hidden, I expert intermediate size, N rows.

A *fused experts module* is a module named ``experts`` inside a decoder layer
(``…layers.<i>.…`` or ``…blocks.<i>.…``) holding 3-D parameters ``gate_up_proj`` and
``down_proj`` and called as ``experts(hidden [T, H], top_k_index [T, K], top_k_weights [T, K])``.
transformers' ``@use_experts_implementation`` describes its layout with flags, which rq reads:

    is_transposed    False: gate_up_proj [E, 2I, H], down_proj [E, H, I] (nn.Linear layout)
                     True:  gate_up_proj [E, H, 2I], down_proj [E, I, H]
    is_concatenated  True: gate rows then up rows; False: interleaved (gate0, up0, gate1, ...)
    has_bias         gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
    has_gate         False: up_proj only (non-gated experts; not supported by rq yet)
    has_post_expert_norm   a norm after each expert (not supported by rq yet)

Classes without the flags get them inferred from the shapes (``hidden_size`` of the config).
The activation is read from the module too and checked numerically (``detect_activation``), so
a family whose experts compute something rq cannot reproduce gets an error instead of a wrong model.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RQError
from .activation import activation_fn

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)")
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one family's fused experts module stores its tensors (see module docstring)."""

    transposed: bool = False
    interleaved: bool = False
    has_bias: bool = False

    def to_canonical(self, role: str, t: torch.Tensor) -> torch.Tensor:
        """A runtime tensor ``[E, ...]`` of ``role`` (gate_up | down | gate_up_bias | down_bias) ->
        canonical (``gate_up [E, 2I, H]``, ``down [E, H, I]``, ``gate_up_bias [E, 2I]``)."""
        if role in ("gate_up", "down") and self.transposed:
            t = t.transpose(1, 2)
        if role in ("gate_up", "gate_up_bias") and self.interleaved:
            t = deinterleave(t, dim=1 if role == "gate_up" else -1)
        return t

    def from_canonical_rows(self, h: torch.Tensor) -> torch.Tensor:
        """``h [N, 2I]`` in canonical order (gate | up) -> the runtime order of this layout."""
        if not self.interleaved:
            return h
        gate, up = h.chunk(2, dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(gate0, up0, gate1, up1, ...) along ``dim`` -> (gate0, gate1, ..., up0, up1, ...)."""
    dim = dim % t.dim()
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(0, None, 2)
    even = t[tuple(idx)]
    idx[dim] = slice(1, None, 2)
    return torch.cat([even, t[tuple(idx)]], dim=dim)


@dataclass(frozen=True)
class MoEBlockInfo:
    """One MoE block found in a model."""

    layer: int  # absolute decoder-layer index
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    experts_class: str


def layer_index(path: str) -> int | None:
    m = None
    for m in _LAYER.finditer(path):
        pass
    return int(m.group(1)) if m else None


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-D ``gate_up_proj`` (or ``up_proj``) and ``down_proj`` parameters."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    up = params.get("gate_up_proj", params.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def find_moe_blocks(model: nn.Module, is_experts=is_fused_experts) -> list[MoEBlockInfo]:
    """Every ``…layers.<i>.<block>.experts`` module that ``is_experts`` accepts, one per layer."""
    out: dict[int, MoEBlockInfo] = {}
    for name, module in model.named_modules():
        if not name.endswith(".experts") or not is_experts(module):
            continue
        path = name.rsplit(".", 1)[0]
        layer = layer_index(path)
        if layer is None:
            continue
        if layer in out:
            raise RQError(f"decoder layer {layer} has more than one experts module ({out[layer].path}.experts and "
                          f"{name}); rq handles one MoE block per layer")
        out[layer] = MoEBlockInfo(layer, path, type(module).__name__)
    return [out[k] for k in sorted(out)]


def experts_flags(experts: nn.Module, hidden_size: int) -> dict[str, bool]:
    """``has_gate``, ``transposed``, ``interleaved``, ``has_bias``, ``post_norm`` of an experts module."""
    params = dict(experts.named_parameters(recurse=False))
    has_gate = bool(getattr(experts, "has_gate", "gate_up_proj" in params))
    if hasattr(experts, "is_transposed"):
        transposed = bool(experts.is_transposed)
    else:  # infer: down_proj [E, H, I] (Linear layout) or [E, I, H]
        down = params["down_proj"]
        transposed = down.shape[1] != hidden_size and down.shape[2] == hidden_size
    return {
        "has_gate": has_gate,
        "transposed": transposed,
        "interleaved": not bool(getattr(experts, "is_concatenated", True)),
        "has_bias": bool(getattr(experts, "has_bias", "down_proj_bias" in params)),
        "post_norm": bool(getattr(experts, "has_post_expert_norm", False)),
    }


def takes_routing(experts: nn.Module) -> bool:
    """Whether the experts' forward takes ``(hidden, top_k_index, top_k_weights)``."""
    try:
        params = list(inspect.signature(type(experts).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def router_of(block: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    for name, mod in block.named_children():
        if "router" in name or name.endswith("gate") and "shared" not in name:
            return mod
    return None


def shared_modules(block: nn.Module) -> list[nn.Module]:
    """Shared (always-on) experts of a block: children named ``*shared*`` that are not gates."""
    out = []
    for name, mod in block.named_children():
        if "shared" in name and not name.endswith("_gate"):
            out.append(mod)
    return out


# ------------------------------------------------------------------------------------ activation
_PROBE_ROWS = 16


def probe_rows(two_i: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # wide range so that clamps (gpt-oss limit 7) and softcaps are exercised
    return (torch.randn(_PROBE_ROWS, two_i, generator=g) * 6.0).to(dtype)


def act_names(act_fn: nn.Module | None) -> list[str]:
    """ACT2FN names whose class is the type of ``act_fn`` (candidates for ``glu:<name>``)."""
    if act_fn is None:
        return []
    from transformers.activations import ACT2CLS

    out = []
    for name, cls in ACT2CLS.items():
        cls = cls[0] if isinstance(cls, tuple) else cls
        if cls is type(act_fn):
            out.append(name)
    return out


def _number(experts: nn.Module, config, *names: str) -> float | None:
    for n in names:
        for src in (experts, config):
            v = getattr(src, n, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def candidate_activations(experts: nn.Module, config) -> list[str]:
    """Activation specs (``activation.py``) the experts module might compute, most likely first."""
    names = act_names(getattr(experts, "act_fn", None))
    hidden_act = getattr(config, "hidden_act", None)
    if isinstance(hidden_act, str):  # the config's own name first, so specs read as the config does
        names = [hidden_act] + [n for n in names if n != hidden_act]
    specs = [f"glu:{n}" for n in names]
    alpha = _number(experts, config, "alpha", "swiglu_alpha")
    limit = _number(experts, config, "limit", "swiglu_limit")
    if alpha is not None and limit is not None:
        specs.append(f"gptoss:{alpha!r}:{limit!r}")
    return specs


def detect_activation(experts: nn.Module, layout: ExpertsLayout, config, two_i: int) -> str:
    """The activation spec whose output equals the module's own gate on a probe ``[N, 2I]``.

    ``experts._apply_gate`` (transformers' hook, gated experts) is called on rows in the module's
    own layout; the spec is applied to the same rows in canonical order. Raises RQError if none fits.
    """
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:
        act = getattr(experts, "act_fn", None)
        if act is None:
            raise RQError(f"{type(experts).__name__}: no _apply_gate or act_fn to read the expert activation from")

        def apply_gate(h):
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up

    canon = probe_rows(two_i)
    try:
        with torch.no_grad():
            want = apply_gate(layout.from_canonical_rows(canon))
    except Exception as e:  # a gate that needs parameters we cannot evaluate on a probe
        raise RQError(f"{type(experts).__name__}: cannot evaluate its expert activation ({type(e).__name__})") from None
    tried = []
    for spec in candidate_activations(experts, config):
        try:
            got = activation_fn(spec)(canon)
        except RQError:
            continue
        tried.append(spec)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return spec
    raise RQError(f"{type(experts).__name__}: its expert activation is none rq can compute "
                  f"(tried {', '.join(tried) or 'none'})")
