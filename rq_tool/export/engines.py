"""What each serving engine is given: a placement plan, then per engine a file, flags and notes (pure).

Legend: L MoE layers, E logical experts, R redundant slots per layer, P = E + R, G GPUs (EP size),
D decoder layers.

``plan_placement`` picks R (given, or rq's recommendation, see ``location.recommend_redundant``)
and places the slots; an ``Engine`` from ``ENGINES`` turns the plan into what the engine reads:

- ``sglang``: ``--init-expert-location FILE`` with ``{"physical_to_logical_map": [D, P]}`` (used
  as is), or with ``--logical-count`` ``{"logical_count": [D, E]}`` (SGLang runs its own EPLB on
  the counts);
- ``vllm``: no placement file can be loaded yet; the ``--eplb-config`` with rq's R, vLLM then
  starts from identity + round-robin redundancy and learns the load online.

Both engines build the EP group inside the tensor-parallel group, so the flags carry the
parallel size too: SGLang derives ``moe_tp_size = tp_size // ep_size`` (sglang
``srt/runtime_context.py`` ``derive_parallel_widths``; ``--ep-size 8`` with the default
``--tp-size 1`` gives 0 and the ranks cannot be laid out), so it is given ``--tp-size N
--ep-size N``; vLLM's EP size is TP x DP (``FusedMoEParallelConfig.make``: ``ep_size =
tp_size`` after flattening TP across DP) and its ``ParallelConfig`` refuses ``--enable-eplb``
at TP = DP = 1, so it is given ``--tensor-parallel-size N``.

``EPLB_SUPPORT`` says, per engine, which families' models implement that engine's EPLB hook
(SGLang 0.5.23: ``get_model_config_for_expert_location`` on the model class, else the expert
location is silently not used; vLLM 0.33: the ``MixtureOfExperts`` interface, else EPLB is
not set up); ``eplb_warning`` turns a missing one into one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import defaults
from ..errors import RQError
from .location import (balanced_phy2log, check_redundant, engine_default_phy2log, gpu_max_mean, logical_count_map,
                       physical_to_logical_map, recommend_redundant)


@dataclass(frozen=True)
class PlacementPlan:
    """R, the placement and its predicted per-GPU max/mean (``[L]`` each, 1.0 = balanced)."""

    layers: tuple[int, ...]  # absolute ids of the MoE layers
    num_hidden_layers: int
    load: torch.Tensor  # [L, E] measured loads
    ep_size: int
    redundant: int
    recommended: bool  # R chosen by rq (True) or given by the user
    target: float  # the max/mean the recommendation aimed for
    phy2log: torch.Tensor  # [L, P] rq's placement, GPU-major
    engine_default: torch.Tensor  # [L] identity + round-robin redundancy at the same R
    rq: torch.Tensor  # [L] rq's placement
    identity: torch.Tensor | None  # [L] no redundancy (R = 0); None when E % G != 0

    @property
    def num_experts(self) -> int:
        return int(self.load.shape[-1])

    @property
    def num_physical(self) -> int:
        return self.num_experts + self.redundant

    def summary(self) -> dict:
        def stats(x):
            return None if x is None else {"mean": float(x.mean()), "max": float(x.max()), "per_layer": x.tolist()}

        return {"ep_size": self.ep_size, "num_experts": self.num_experts, "redundant": self.redundant,
                "redundant_recommended": self.recommended, "target_max_mean": self.target,
                "num_physical": self.num_physical, "layers": list(self.layers),
                "max_mean": {"identity": stats(self.identity), "engine_default": stats(self.engine_default),
                             "rq": stats(self.rq)}}


def plan_placement(load: torch.Tensor, layers, num_hidden_layers: int, ep_size: int, redundant: int | None = None,
                   target: float = defaults.EXPORT_TARGET_MAX_MEAN) -> PlacementPlan:
    """Choose R (``None``: rq's recommendation) and place ``load [L, E]`` on ``ep_size`` GPUs."""
    load = load.double().cpu()
    L, E = load.shape
    layers = tuple(int(x) for x in layers)
    if len(layers) != L or len(set(layers)) != L:
        raise RQError(f"{L} MoE layers of loads but layer ids {list(layers)}")
    bad = [x for x in layers if not 0 <= x < num_hidden_layers]
    if bad:
        raise RQError(f"MoE layer ids {bad} are outside the model's {num_hidden_layers} decoder layers")
    if int(ep_size) < 1:
        raise RQError(f"--ep-size must be at least 1, got {ep_size}")
    recommended = redundant is None
    if recommended:
        redundant, _ = recommend_redundant(load, ep_size, target)
    check_redundant(E, ep_size, redundant)
    P = E + redundant
    phy2log = balanced_phy2log(load, P, ep_size)
    identity = gpu_max_mean(load, torch.arange(E)[None], ep_size) if E % ep_size == 0 else None
    return PlacementPlan(layers, int(num_hidden_layers), load, int(ep_size), int(redundant), recommended, target,
                         phy2log, gpu_max_mean(load, engine_default_phy2log(E, P)[None], ep_size),
                         gpu_max_mean(load, phy2log, ep_size), identity)


# model_type -> does the engine's model class implement its EPLB hook (checked against the code
# of the versions named in the module docstring; other model types: not checked)
EPLB_SUPPORT: dict[str, dict[str, bool]] = {
    "sglang": {"deepseek_v3": True, "deepseek_v2": True, "qwen2_moe": True, "qwen3_moe": True, "gpt_oss": True,
               "glm4_moe": True, "qwen3_next": True, "mixtral": False, "olmoe": False, "dbrx": False,
               "llama4": False},
    "vllm": {"deepseek_v3": True, "deepseek_v2": True, "qwen3_moe": True, "mixtral": True, "glm4_moe": True,
             "qwen3_next": True, "llama4": True, "qwen2_moe": False, "olmoe": False, "gpt_oss": False,
             "dbrx": False},
}


def eplb_warning(engine: str, model_type: str | None) -> str | None:
    """One line when ``engine`` does not implement EPLB for ``model_type`` (or rq has not checked)."""
    known = EPLB_SUPPORT.get(engine, {})
    if model_type in known and known[model_type]:
        return None
    if model_type in known:
        return (f"{engine} does not implement expert-parallel load balancing for {model_type!r} models: it "
                "will not use this placement or R (the numbers above are what an engine that does would get)")
    return f"rq has not checked whether {engine} implements expert-parallel load balancing for {model_type!r} models"


@dataclass(frozen=True)
class EngineExport:
    """``content``: the JSON written to ``--out`` (None: nothing to write); ``flags``: server flags;
    ``warnings``: what will not work as printed (one line each)."""

    content: dict | None
    flags: list[str]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _shell_quote_json(obj) -> str:
    return "'" + json.dumps(obj, separators=(", ", ": ")) + "'"


def _sglang(plan: PlacementPlan, out: str | None, logical_count: bool) -> EngineExport:
    out = out or defaults.EXPORT_SGLANG_FILE
    if logical_count:
        content = {"logical_count": logical_count_map(plan.layers, plan.load, plan.num_hidden_layers).tolist()}
        notes = ["SGLang plans the placement itself from these counts (rq's 'after' is EPLB's global policy on "
                 "the same counts); add --enable-eplb --expert-distribution-recorder-mode stat to keep "
                 "rebalancing online from live traffic"]
    else:
        content = {"physical_to_logical_map": physical_to_logical_map(
            plan.layers, plan.phy2log, plan.num_experts, plan.num_hidden_layers).tolist()}
        notes = ["dense layers' rows are identity + round-robin (SGLang never reads them)"]
    flags = [f"--tp-size {plan.ep_size}", f"--ep-size {plan.ep_size}", f"--ep-num-redundant-experts {plan.redundant}",
             f"--init-expert-location {out}"]
    if logical_count:
        flags.append("--enable-eplb")
    notes.append(f"SGLang lays the EP group out inside the TP group: keep --tp-size {plan.ep_size} with --ep-size "
                 f"{plan.ep_size} (the default --tp-size 1 cannot hold an EP group of {plan.ep_size})")
    return EngineExport(content, flags, notes)


def _vllm(plan: PlacementPlan, out: str | None, logical_count: bool) -> EngineExport:
    if logical_count:
        raise RQError("--logical-count is SGLang's format; vLLM cannot be given loads or a placement "
                      "(use --engine sglang, or drop --logical-count)")
    if plan.ep_size < 2:
        raise RQError("vLLM refuses --enable-eplb on one GPU (tensor x data parallel size 1); use --ep-size 2 or more")
    eplb = {"num_redundant_experts": plan.redundant, "window_size": defaults.VLLM_EPLB_WINDOW_SIZE,
            "step_interval": defaults.VLLM_EPLB_STEP_INTERVAL}
    flags = [f"--tensor-parallel-size {plan.ep_size}", "--enable-expert-parallel", "--enable-eplb",
             f"--eplb-config {_shell_quote_json(eplb)}"]
    notes = [f"vLLM cannot load a static placement yet: it starts from identity + round-robin redundancy "
             f"(predicted max/mean {float(plan.engine_default.mean()):.3f}) and learns the load online; rq's "
             f"placement ({float(plan.rq.mean()):.3f}) is what its EPLB can reach when traffic looks like the "
             "calibration set",
             f"vLLM's EP size is tensor-parallel x data-parallel size: -tp {plan.ep_size} above, or any TP x DP = "
             f"{plan.ep_size} (e.g. --data-parallel-size {plan.ep_size} with -tp 1); vLLM refuses EPLB at TP = DP = 1"]
    return EngineExport(eplb if out else None, flags, notes)


def _sglang_precision_warnings(schemes: set[str]) -> list[str]:
    # sglang compressed_tensors.py get_moe_scheme: the Triton WNA16 MoE takes int4 groups of 32/128 only
    if "int8" in schemes:
        return ["SGLang runs 8-bit MoE weights only on its Marlin MoE kernel (--moe-runner-backend auto, the "
                "default); --moe-runner-backend triton refuses the int8 layers"]
    return []


def _vllm_precision_warnings(schemes: set[str]) -> list[str]:
    # vllm CompressedTensorsWNA16MoEMethod.supports_eplb: Triton backend only; non-Marlin asserts group strategy
    if not set(schemes) & {"int8", "nf4"}:
        return []
    if "int8" in schemes:
        return ["vLLM's EPLB runs quantized MoE layers only on its Triton WNA16 kernel, which refuses per-channel "
                "int8: serve this config without --enable-eplb (or re-export with a budget that keeps no layer in "
                "int8)"]
    return ["vLLM's EPLB runs quantized MoE layers only on its Triton WNA16 kernel: with --enable-eplb add "
            "--moe-backend triton (the default Marlin kernel has no EPLB and vLLM refuses to start)"]


@dataclass(frozen=True)
class Engine:
    name: str
    placement: Callable[[PlacementPlan, str | None, bool], EngineExport]
    # names the engine asks a quantization_config about besides the checkpoint's per-expert names
    moe_probe_projections: tuple[str, ...] = ()
    precision_warnings: Callable[[set[str]], list[str]] = lambda schemes: []

    def build(self, plan: PlacementPlan, out: str | None, logical_count: bool,
              model_type: str | None = None) -> EngineExport:
        """The engine's file, flags and notes for ``plan``, with a warning when the engine does not
        implement EPLB for ``model_type`` (``EPLB_SUPPORT``)."""
        result = self.placement(plan, out, logical_count)
        warning = eplb_warning(self.name, model_type)
        return result if warning is None else EngineExport(result.content, result.flags, result.notes,
                                                           [*result.warnings, warning])


ENGINES: dict[str, Engine] = {
    # sglang get_moe_scheme asks about "<experts>.0.gate_proj/up_proj/down_proj" whatever the checkpoint calls them
    "sglang": Engine("sglang", _sglang, ("gate_proj", "up_proj", "down_proj"), _sglang_precision_warnings),
    "vllm": Engine("vllm", _vllm, (), _vllm_precision_warnings),
}
assert tuple(ENGINES) == defaults.EXPORT_ENGINES, "update defaults.EXPORT_ENGINES (the CLI offers those)"


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise RQError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
