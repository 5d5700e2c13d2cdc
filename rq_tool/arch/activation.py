"""Expert activations, named by a short spec string shared by calibration, runtime and kernels.

- ``"glu:<act>"``: ``act(gate) * up`` with ``gate, up = h[..., :I], h[..., I:]`` (Mixtral, Qwen,
  OLMoE, DeepSeek); ``<act>`` is a transformers ACT2FN name (silu, gelu, ...).
- ``"gptoss:<alpha>:<limit>"``: gpt-oss clamped SwiGLU on the de-interleaved halves:
  ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import RQError


@functools.lru_cache(maxsize=32)
def activation_fn(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``h [N, 2I] -> [N, I]`` for an activation spec (see module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "glu":
        from transformers.activations import ACT2FN

        if rest not in ACT2FN:
            raise RQError(f"unknown expert activation {rest!r} in {spec!r}")
        act = ACT2FN[rest]

        def glu(h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up

        return glu
    if kind == "gptoss":
        alpha_s, _, limit_s = rest.partition(":")
        alpha, limit = float(alpha_s), float(limit_s)

        def gptoss(h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(gate * alpha))

        return gptoss
    raise RQError(f"unknown activation spec {spec!r} (expected 'glu:<act>' or 'gptoss:<alpha>:<limit>')")


def expert_forward(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: str,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert on its tokens: ``x [N, H]``, ``gate_up [2I, H]``, ``down [H, I]`` -> ``[N, H]``."""
    h = F.linear(x, gate_up, gate_up_bias)
    return F.linear(activation_fn(act)(h), down, down_bias)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``x [S, in]`` sorted by group, ``w [G, out, in]``, ``counts [G]`` -> ``[S, out]``."""
    gm = getattr(F, "grouped_mm", None)
    if gm is not None and x.dtype == w.dtype and x.dtype in (torch.float32, torch.bfloat16):
        try:
            out = gm(x, w.transpose(-2, -1), offs=offs)
        except RuntimeError:  # strides/alignment the native kernel does not take
            out = None
        if out is not None:
            if bias is not None:
                out = out + torch.repeat_interleave(bias, torch.tensor(counts, device=x.device), dim=0)
            return out
    parts = [F.linear(xg, w[g], None if bias is None else bias[g]) for g, xg in enumerate(x.split(counts))]
    return torch.cat(parts)


def grouped_expert_forward(
    x_sorted: torch.Tensor,
    counts: list[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: str,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """All experts at once on rows grouped by expert (one grouped matmul per projection).

    ``x_sorted [S, H]`` rows of expert 0 first, then expert 1, ...; ``counts [E]`` rows per
    expert; ``gate_up [E, 2I, H]``, ``down [E, H, I]`` -> unweighted outputs ``[S, H]``.
    """
    offs = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
    h = grouped_linear(x_sorted, gate_up, counts, offs, gate_up_bias)
    return grouped_linear(activation_fn(act)(h), down, counts, offs, down_bias)
