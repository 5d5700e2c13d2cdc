"""One quantization scheme per MoE layer, for engines that cannot mix schemes inside a layer (pure).

Legend: L MoE layers, E logical experts, S schemes; scheme column 0 is the source scheme
(unquantized, zero error by contract, as in the planner's ``error [L, E, S]``).

rq's own rewrite quantizes single experts. vLLM and SGLang decide a MoE layer's quantization
from one of its experts and run the whole fused layer in that scheme; different layers may
differ (compressed-tensors' ``"format": "mixed-precision"``). For them the choice is per layer,
a multiple-choice knapsack: every layer picks one scheme, the total bytes must fit the budget,
the summed predicted error should be as low as possible. ``choose_layer_precision`` solves it
greedily:

1. every layer starts in the source scheme;
2. while over budget, make the move (layer l: its scheme -> a smaller one) that adds the least
   predicted error per byte saved (ties: the layer whose new error is the smaller share of its
   output power, then the lower layer id);
3. give precision back: while a layer can move to a scheme with less error and the total still
   fits, make the move that removes the most error (step 2 can overshoot the budget).

A layer's predicted error in scheme s is ``sum_e quant_error[l, e, s]``: calibration's sum over
routed tokens of ``w^2 ||y - y_s||^2``, the planner's own measure. Every layer's error lands in
the same residual stream, so errors of different layers add up.

``compressed_tensors_config`` writes the choice as a compressed-tensors ``quantization_config``.
Scheme mapping: rq's ``int8`` (symmetric absmax per output row) is compressed-tensors' int8
``channel`` strategy exactly; ``nf4`` has no compressed-tensors type, so it maps to symmetric
int4 with groups of 64 (nf4's block size), the nearest format the engines serve -- rq's measured
nf4 error is then an estimate for it, not a measurement.
"""

from __future__ import annotations

import torch

from ..errors import RQError
from ..quant.schemes import NF4_BLOCKSIZE

# rq scheme -> compressed-tensors weight quantization args (weight-only; activations stay as is)
ENGINE_WEIGHT_SCHEMES: dict[str, dict] = {
    "int8": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "nf4": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": NF4_BLOCKSIZE},
}
# compressed-tensors storage format of one weight-only group (int4 and int8 both pack)
_GROUP_FORMAT = "pack-quantized"


def choose_layer_precision(quant_error: torch.Tensor, output_power: torch.Tensor, layer_bytes: torch.Tensor,
                           budget_bytes: int) -> torch.Tensor:
    """Pick one scheme per MoE layer (module docstring): ``-> [L]`` int64 scheme index per layer.

    ``quant_error [L, E, S]`` predicted error of each expert in each scheme (column 0: the
    source scheme, zero); ``output_power [L, E]`` (``sum w^2 ||y||^2``, only breaks ties);
    ``layer_bytes [S]`` or ``[L, S]`` stored bytes of a layer's experts in each scheme;
    ``budget_bytes``: total over all MoE layers. Raises RQError when even the smallest scheme
    everywhere does not fit.
    """
    err = quant_error.double().sum(1)  # [L, S]
    L, S = err.shape
    nbytes = torch.as_tensor(layer_bytes, dtype=torch.int64).expand(L, S)
    power = output_power.double().sum(-1).clamp_min(torch.finfo(torch.float64).tiny)  # [L]
    e, b, pw = err.tolist(), nbytes.tolist(), power.tolist()
    smallest = int(nbytes.min(-1).values.sum())
    if smallest > budget_bytes:
        raise RQError(f"budget {budget_bytes} bytes is below {smallest} bytes, the expert memory with every MoE layer "
                      "in its smallest scheme", hint="raise --budget")
    choice = [0] * L
    total = sum(b[i][0] for i in range(L))
    while total > budget_bytes:  # every move saves bytes: terminates
        best = None
        for i in range(L):
            c = choice[i]
            for s in range(S):
                saved = b[i][c] - b[i][s]
                if saved > 0:
                    key = ((e[i][s] - e[i][c]) / saved, e[i][s] / pw[i], i, s)
                    best = key if best is None or key < best else best
        _, _, i, s = best
        total += b[i][s] - b[i][choice[i]]
        choice[i] = s
    while True:  # every move removes error: terminates
        best = None
        for i in range(L):
            c = choice[i]
            for s in range(S):
                if e[i][s] < e[i][c] and total - b[i][c] + b[i][s] <= budget_bytes:
                    key = (e[i][s] - e[i][c], i, s)
                    best = key if best is None or key < best else best
        if best is None:
            break
        _, i, s = best
        total += b[i][s] - b[i][choice[i]]
        choice[i] = s
    return torch.tensor(choice, dtype=torch.int64)


def precision_summary(quant_error: torch.Tensor, output_power: torch.Tensor, layer_bytes: torch.Tensor,
                      choice: torch.Tensor) -> dict:
    """Bytes and predicted error of a choice: ``{"bytes": [L], "error": [L], "relative_error": [L]}``
    (lists; relative error = error / output power) plus ``"total_bytes"``, ``"total_error"``."""
    err = quant_error.double().sum(1)  # [L, S]
    L, S = err.shape
    nbytes = torch.as_tensor(layer_bytes, dtype=torch.int64).expand(L, S)
    rows = torch.arange(L)
    chosen_err = err[rows, choice]
    power = output_power.double().sum(-1)
    rel = torch.where(power > 0, chosen_err / power.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(power))
    chosen_bytes = nbytes[rows, choice]
    return {"bytes": chosen_bytes.tolist(), "error": chosen_err.tolist(), "relative_error": rel.tolist(),
            "total_bytes": int(chosen_bytes.sum()), "total_error": float(chosen_err.sum())}


def expert_target(layer: int) -> str:
    """compressed-tensors target matching the routed experts of decoder layer ``layer``, whatever
    the family calls the MoE block (``mlp``, ``block_sparse_moe``): ``…layers.<l>.….experts[.…]``.

    It matches the fused experts module and its per-expert children (``experts.0.gate_proj``);
    it does not match ``shared_experts``, the router, or another layer.
    """
    return rf"re:(.*\.)?layers\.{int(layer)}\.(.*\.)?experts(\..*)?$"


def compressed_tensors_config(layer_scheme: dict[int, str]) -> dict:
    """A compressed-tensors ``quantization_config`` for one scheme per MoE layer.

    ``layer_scheme``: absolute decoder-layer id -> rq scheme name; layers whose scheme is not in
    ``ENGINE_WEIGHT_SCHEMES`` (the source scheme) stay unquantized and are simply not targeted.
    One config group per scheme used, in ``ENGINE_WEIGHT_SCHEMES`` order.
    """
    groups = {}
    for scheme, weights in ENGINE_WEIGHT_SCHEMES.items():
        layers = sorted(int(l) for l, s in layer_scheme.items() if s == scheme)
        if layers:
            groups[f"group_{len(groups)}"] = {"targets": [expert_target(l) for l in layers], "weights": dict(weights),
                                              "input_activations": None, "output_activations": None,
                                              "format": _GROUP_FORMAT}
    return {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ["lm_head"]}


def plan_layer_precision(profile, layers, layer_bytes: torch.Tensor, names: list[str], budget) -> dict:
    """``rq export --per-layer-precision`` as one call: the choice, its predicted cost and the config.

    ``profile``: the measured ``Profile``; ``layers [L]`` absolute MoE layer ids; ``layer_bytes
    [L, S]`` and ``names [S]`` (source scheme first) from ``source.layer_scheme_bytes``; ``budget``
    a ``--budget`` spec for all MoE layers together. Returns ``{"budget_bytes", "original_bytes",
    "layers": [{"layer", "scheme", "bytes", "error", "relative_error"}], "total_bytes",
    "total_error", "quantization_config"}``.
    """
    from ..plan import resolve_budget

    L, E = len(layers), profile.num_experts
    quant_error = torch.cat([torch.zeros(L, E, 1, dtype=torch.float64),
                             profile.quant_error_tensor(names[1:])], dim=-1)  # [L, E, S]
    output_power = torch.stack([lp.output_power for lp in profile.layers])  # [L, E]
    budget_bytes = resolve_budget(budget, layer_bytes[:1].expand(L), global_=True)
    choice = choose_layer_precision(quant_error, output_power, layer_bytes, budget_bytes)
    summary = precision_summary(quant_error, output_power, layer_bytes, choice)
    rows = [{"layer": layer, "scheme": names[int(c)], "bytes": b, "error": e, "relative_error": r}
            for layer, c, b, e, r in zip(layers, choice, summary["bytes"], summary["error"],
                                         summary["relative_error"])]
    return {"budget_bytes": int(budget_bytes), "original_bytes": int(layer_bytes[0]) * L, "layers": rows,
            "total_bytes": summary["total_bytes"], "total_error": summary["total_error"],
            "quantization_config": compressed_tensors_config({row["layer"]: row["scheme"] for row in rows})}
