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

``compressed_tensors_config`` writes the choice as a compressed-tensors ``quantization_config``
that both engines load (checked against their code: SGLang 0.5.23
``srt/layers/quantization/compressed_tensors/compressed_tensors.py``, vLLM 0.33
``model_executor/layers/quantization/compressed_tensors/``):

- top-level ``"format"`` is the groups' own format (``pack-quantized``): SGLang's Marlin MoE
  scheme (``CompressedTensorsWNA16MoE.__init__``) checks the TOP-level format and refuses
  ``"mixed-precision"``; ``"mixed-precision"`` is written only if groups ever differ;
- targets name the per-expert projections as the CHECKPOINT names them (``experts.<e>.gate_proj``,
  Mixtral's ``experts.<e>.w1``), never the experts container: the engines ask the config about
  ``<experts>.0.<proj>`` (vLLM with the checkpoint's names, SGLang always with
  ``gate_proj``/``up_proj``/``down_proj``, so ``sglang`` targets carry both), and
  compressed-tensors' ``apply_quantization_config`` attaches schemes to Linear modules only;
- ``ignore`` lists every other Linear-shaped weight of the checkpoint (attention, routers,
  shared experts, dense MLPs, lm_head) and the experts of MoE layers left unquantized: SGLang's
  ``find_matched_target`` raises for a layer that is neither targeted nor ignored. Names that
  differ only in the layer index are folded into one anchored regex.

Scheme mapping: rq's ``int8`` (symmetric absmax per output row) is compressed-tensors' int8
``channel`` strategy exactly; ``nf4`` has no compressed-tensors type, so it maps to symmetric
int4 with groups of 32 and 16-bit scales -- the same 4.5 bits per weight as nf4's 64-blocks with
fp32 absmax, and a group size SGLang's Triton MoE kernel takes (32 or 128 only; 64 is refused);
rq's measured nf4 error is then an estimate for it, not a measurement. No int8 setting runs on
SGLang's Triton MoE kernel or on vLLM's EPLB-capable one (``ENGINE_PRECISION_WARNINGS`` in
``engines`` says so when int8 is chosen).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import RQError

# int4 group size: 16-bit scales per 32 weights = nf4's fp32 absmax per 64 (4.5 bits per weight);
# SGLang's Triton WNA16 MoE takes 32 or 128 (``_is_wna16_triton_moe_supported``)
INT4_GROUP_SIZE = 32
# rq scheme -> compressed-tensors weight quantization args (weight-only; activations stay as is)
ENGINE_WEIGHT_SCHEMES: dict[str, dict] = {
    "int8": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
    "nf4": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": INT4_GROUP_SIZE},
}
# compressed-tensors storage format of one weight-only group (int4 and int8 both pack)
_GROUP_FORMAT = "pack-quantized"
_MIXED_FORMAT = "mixed-precision"  # compressed-tensors' top-level format when groups' formats differ


@dataclass(frozen=True)
class ServingNames:
    """The checkpoint's module names a ``quantization_config`` is matched against (on-disk names:
    the engines build their modules under the checkpoint's names).

    ``experts``: MoE layer -> its experts container, e.g. ``"model.layers.3.mlp.experts"``;
    ``projections``: the per-expert Linear names under ``<experts>.<e>.`` (``gate_proj``, ``w1``);
    ``other_linear``: every other module with a 2-D ``weight`` (attention, routers, shared
    experts, dense MLPs, embeddings, lm_head).
    """

    experts: dict[int, str]
    projections: tuple[str, ...]
    other_linear: tuple[str, ...]


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


def expert_target(experts_path: str, projections) -> str:
    """compressed-tensors target (``re:``, matched from the start of a module name) for the
    per-expert projections of one experts container: ``<experts_path>.<e>.<proj>`` for every
    expert ``e`` and ``proj`` in ``projections``. Not the container, not a shared expert, not
    another layer (``layers.3`` never matches ``layers.30``)."""
    names = "|".join(re.escape(p) for p in sorted(set(projections)))
    return rf"re:{re.escape(experts_path)}\.\d+\.({names})$"


_LAYER_INDEX = re.compile(r"(?<=\.layers\.)\d+(?=\.)")


def ignore_patterns(names) -> list[str]:
    r"""Module names, names differing only in their ``layers.<n>`` index folded into one anchored
    regex (``re:model\.layers\.\d+\.self_attn\.q_proj$``); the others kept exact. Sorted."""
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(_LAYER_INDEX.sub("#", name, count=1), []).append(name)
    out = []
    for template, members in groups.items():
        if len(members) == 1:
            out.append(members[0])
        else:
            out.append("re:" + re.escape(template).replace("\\#", "#").replace("#", r"\d+") + "$")
    return sorted(out)


def compressed_tensors_config(layer_scheme: dict[int, str], names: ServingNames, probe_projections=()) -> dict:
    """A compressed-tensors ``quantization_config`` for one scheme per MoE layer (module docstring).

    ``layer_scheme``: absolute decoder-layer id -> rq scheme name (every layer of ``names.experts``);
    layers whose scheme is not in ``ENGINE_WEIGHT_SCHEMES`` (the source scheme) stay unquantized and
    are ignored. ``probe_projections``: names an engine asks about besides the checkpoint's
    (SGLang: ``gate_proj``/``up_proj``/``down_proj``). One config group per scheme used, in
    ``ENGINE_WEIGHT_SCHEMES`` order.
    """
    missing = sorted(set(names.experts) - set(layer_scheme))
    if missing:
        raise RQError(f"no scheme chosen for MoE layers {missing}")
    projections = (*names.projections, *probe_projections)
    groups = {}
    for scheme, weights in ENGINE_WEIGHT_SCHEMES.items():
        layers = sorted(int(l) for l, s in layer_scheme.items() if s == scheme)
        if layers:
            groups[f"group_{len(groups)}"] = {
                "targets": [expert_target(names.experts[l], projections) for l in layers], "weights": dict(weights),
                "input_activations": None, "output_activations": None, "format": _GROUP_FORMAT}
    formats = {g["format"] for g in groups.values()}
    unquantized = sorted(l for l, s in layer_scheme.items() if s not in ENGINE_WEIGHT_SCHEMES)
    other = set(names.other_linear) | ({"lm_head"} if not any(n.endswith("lm_head") for n in names.other_linear)
                                       else set())
    ignore = ignore_patterns(other) + [expert_target(names.experts[l], projections) for l in unquantized]
    return {"quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else _MIXED_FORMAT if formats else _GROUP_FORMAT,
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore}


def plan_layer_precision(profile, layers, layer_bytes: torch.Tensor, names: list[str], budget,
                         serving: ServingNames, probe_projections=()) -> dict:
    """``rq export --per-layer-precision`` as one call: the choice, its predicted cost and the config.

    ``profile``: the measured ``Profile``; ``layers [L]`` absolute MoE layer ids; ``layer_bytes
    [L, S]`` and ``names [S]`` (source scheme first) from ``source.layer_scheme_bytes``; ``budget``
    a ``--budget`` spec for all MoE layers together; ``serving`` and ``probe_projections``: see
    ``compressed_tensors_config``. Returns ``{"budget_bytes", "original_bytes",
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
            "quantization_config": compressed_tensors_config({row["layer"]: row["scheme"] for row in rows}, serving,
                                                             probe_projections)}
