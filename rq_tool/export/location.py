"""Expert locations for serving engines: replicas and GPUs from rq's measured loads (pure).

Legend: L MoE layers, E logical experts, R redundant slots per layer, P = E + R physical slots,
N GPUs (the EP size), H decoder layers (``num_hidden_layers``, dense layers included).

SGLang and vLLM lay one layer's P physical slots on N GPUs in equal contiguous blocks: slot p
lives on GPU ``p // (P / N)``, so P must be a multiple of N. rq fills those blocks from the
profile's loads with DeepSeek EPLB's global policy (``rq_tool.plan.eplb.rebalance_experts`` with
one group on one node): each of the R extra slots goes to the expert with the largest
``load / logcnt``, the slots, heaviest first, onto the lightest GPU with room for exactly
``P / N``, numbered GPU-major. ``rq_tool.eval.ep`` simulates the same call: the exported file,
rq's reports and the simulator agree by construction. Both engines start without a placement
file from identity + round-robin redundancy (slot p holds expert ``p % E``); that is the
"before" rq reports.
"""

from __future__ import annotations

import torch

from ..errors import RQError
from ..lis import slot_loads
from ..plan.eplb import rebalance_experts
from ..plan.placement import device_loads, max_mean


def valid_redundant(num_experts: int, ep_size: int, around: int) -> list[int]:
    """The valid R (``(E + R) % N == 0``, ``R >= 0``) nearest to ``around``: one value, or two on a tie."""
    E, N = int(num_experts), int(ep_size)
    down = around - (E + around) % N  # the largest valid value <= around (may be < 0)
    up = down + N if (E + around) % N else down
    if up == down or down < 0:
        return [up]
    d_down, d_up = around - down, up - around
    return [down] if d_down < d_up else [up] if d_up < d_down else [down, up]


def check_redundant(num_experts: int, ep_size: int, redundant: int) -> None:
    """Raise RQError unless R >= 0, N >= 1 and ``E + R`` splits evenly over N GPUs."""
    E, N, R = int(num_experts), int(ep_size), int(redundant)
    if N < 1:
        raise RQError(f"--ep-size must be at least 1, got {N}")
    if R < 0:
        raise RQError(f"--redundant must be >= 0, got {R}")
    if (E + R) % N:
        near = " or ".join(str(r) for r in valid_redundant(E, N, R))
        raise RQError(f"{E} experts + {R} redundant = {E + R} physical slots do not split evenly over "
                      f"--ep-size {N} GPUs", hint=f"nearest valid --redundant: {near}")


def engine_default_phy2log(num_experts: int, num_physical: int) -> torch.Tensor:
    """What SGLang and vLLM do without a placement: identity + round-robin, ``[P]`` with ``p % E``."""
    return torch.arange(num_physical, dtype=torch.int64) % int(num_experts)


def balanced_phy2log(load: torch.Tensor, num_physical: int, ep_size: int) -> torch.Tensor:
    """rq's placement (module docstring): ``load [L, E]`` -> ``phy2log [L, P]`` int64, GPU-major.

    A layer with no measured tokens is planned on uniform loads, so its replicas spread
    round-robin instead of all landing on expert 0.
    """
    load = load.double().cpu()
    L, E = load.shape
    P, N = int(num_physical), int(ep_size)
    assert P >= E and P % N == 0, f"{P} slots for {E} experts on {N} GPUs"
    weight = torch.where(load.sum(-1, keepdim=True) > 0, load, torch.ones_like(load))
    return rebalance_experts(weight, P, 1, 1, N)[0]


def gpu_max_mean(load: torch.Tensor, phy2log: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Predicted per-GPU max / mean of each layer: ``load [L, E]``, ``phy2log [L, P]`` -> ``[L]`` f64.

    Tokens split evenly over an expert's slots; slot p on GPU ``p // (P / N)``.
    """
    load = load.double()
    L, E = load.shape
    P, N = phy2log.shape[-1], int(ep_size)
    phy2log = phy2log.expand(L, P).long()
    gpu = torch.arange(P) // (P // N)
    out = torch.empty(L, dtype=torch.float64)
    for i in range(L):
        logcnt = torch.bincount(phy2log[i], minlength=E)
        out[i] = max_mean(device_loads(slot_loads(load[i], phy2log[i], logcnt), gpu, N))
    return out


def recommend_redundant(load: torch.Tensor, ep_size: int, target: float) -> tuple[int, float]:
    """rq's default R: the smallest valid R whose mean over layers of predicted max/mean <= target.

    ``load [L, E]``. Candidates are R >= 0 with ``(E + R) % N == 0``, up to E (or the first
    valid R, when even that exceeds E). When none reaches ``target``, the most balanced
    candidate (smallest R on a tie). Returns ``(R, its mean max/mean)``.
    """
    E, N = load.shape[-1], int(ep_size)
    first = (-E) % N
    best = None
    for R in range(first, max(E, first) + 1, N):
        score = float(gpu_max_mean(load, balanced_phy2log(load, E + R, N), N).mean())
        if score <= target:
            return R, score
        if best is None or score < best[1] - 1e-12:
            best = (R, score)
    return best


def physical_to_logical_map(layers, phy2log: torch.Tensor, num_experts: int, num_hidden_layers: int) -> torch.Tensor:
    """SGLang's ``physical_to_logical_map [H, P]``: rows of absolute layer ids.

    ``layers [L]`` absolute ids of the MoE layers, ``phy2log [L, P]`` their slots. Rows of dense
    layers (never read by the engine, but the shape must cover every decoder layer) get the
    engine's own default, identity + round-robin.
    """
    out = engine_default_phy2log(num_experts, phy2log.shape[-1]).repeat(int(num_hidden_layers), 1)
    for i, layer in enumerate(layers):
        out[int(layer)] = phy2log[i]
    return out


def logical_count_map(layers, load: torch.Tensor, num_hidden_layers: int) -> torch.Tensor:
    """SGLang's ``logical_count [H, E]`` int64: measured loads at absolute ids, zeros for dense layers.

    Zeros are what SGLang's own expert-distribution recorder holds for a layer without experts.
    """
    out = torch.zeros(int(num_hidden_layers), load.shape[-1], dtype=torch.int64)
    for i, layer in enumerate(layers):
        out[int(layer)] = load[i].round().long()
    return out
